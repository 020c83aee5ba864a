"""Usage pages: records with filters and keyset pages, per-call detail, CSV export, summary.

Filters live in the query string, so every view is a shareable URL that works without
JavaScript; htmx swaps #usage-results and pushes the URL.
"""
from __future__ import annotations

import csv
import io
import re

from flask import Blueprint, Response, abort, redirect, request, stream_with_context, url_for
from flask_login import current_user, login_required

from console import charts, settings, usage
from console.hx import render, render_fragment, wants_fragment
from console.models import utcnow
from console.money import format_fixed

bp = Blueprint("usage", __name__, url_prefix="/usage")

_NUMBER = re.compile(r"-?[0-9][0-9.]*")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@bp.route("/")
@login_required
def index():
    args = request.args
    try:
        flt = usage.parse_filter(args)
        before = usage.parse_cursor(args.get("before"))
        after = None if before is not None else usage.parse_cursor(args.get("after"))
    except usage.UsageError as exc:
        page = usage.empty_page(current_user.id, usage.UsageFilter(), str(exc))
        return render("usage/index.html", "usage/partials/usage_results.html", status=422,
                      result=page, form=args, title="Usage")
    try:
        page = usage.records_page(current_user.id, flt, before=before, after=after)
    except usage.UsageNotFound:
        abort(404)
    return render("usage/index.html", "usage/partials/usage_results.html", result=page, form=args,
                  title="Usage")


@bp.route("/<int:record_id>")
@login_required
def detail(record_id: int):
    try:
        d = usage.detail(current_user.id, record_id, settings.get("currency_symbol"))
    except usage.UsageNotFound:
        abort(404)
    return render("usage/detail.html", "usage/partials/usage_detail.html", d=d, title="Call detail")


@bp.route("/<int:record_id>/row")
@login_required
def row(record_id: int):
    """The collapsed row again (htmx "Hide"); without JS there is nothing to collapse."""
    if not wants_fragment():
        return redirect(url_for("usage.detail", record_id=record_id))
    try:
        rec, names = usage.record_row(current_user.id, record_id)
    except usage.UsageNotFound:
        abort(404)
    return render_fragment("usage/partials/usage_row.html", rec=rec, names=names)


def _csv_cell(value):
    """Neutralise spreadsheet formulas in text cells (a model or key name like '=cmd|…')."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


@bp.route("/export.csv")
@login_required
def export():
    try:
        flt = usage.parse_filter(request.args)
    except usage.UsageError as exc:
        abort(422, description=str(exc))
    rows = usage.export_rows(current_user.id, flt)

    def generate():
        buf = io.StringIO()
        writer = csv.writer(buf)
        for r in rows:
            writer.writerow([_csv_cell(v) for v in r])
            if buf.tell() >= 64 * 1024:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()

    resp = Response(stream_with_context(generate()), mimetype="text/csv")
    stamp = utcnow().strftime("%Y%m%d-%H%M%S")
    resp.headers["Content-Disposition"] = f'attachment; filename="usage-{stamp}.csv"'
    return resp


@bp.route("/summary")
@login_required
def summary():
    s = usage.summary(current_user.id)
    return render("usage/summary.html", s=s, charts=_summary_charts(s), title="Usage summary")


def _summary_charts(s: usage.Summary) -> dict[str, charts.Chart]:
    credits = format_fixed
    day_labels = [d.strftime("%m-%d") for d in s.days]
    spend = charts.stacked_bars("Daily spend, last 30 days (credits)", day_labels,
                                list(s.spend_by_model.items()), credits)
    hourly = charts.bars("Calls per hour today (UTC)", [f"{h:02d}" for h in s.hours],
                         s.calls_by_hour, lambda n: f"{n:,}")
    return {"spend": spend, "hourly": hourly}
