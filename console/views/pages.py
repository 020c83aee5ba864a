"""Public and home pages: landing or dashboard, pricing, FAQ, health check."""
from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask_login import current_user
from sqlalchemy import text

from console import faq as faq_service
from console import groups
from console.extensions import db
from console.hx import render
from console.pricing import CLASS_LABELS, TOKEN_CLASSES

bp = Blueprint("pages", __name__)


@bp.route("/")
def home():
    if current_user.is_authenticated:
        from console import usage

        return render("pages/dashboard.html", dash=usage.dashboard(current_user.id))
    return render("pages/landing.html")


@bp.route("/pricing")
def pricing():
    """Models × groups at effective prices, and the calculator (a GET form; htmx gets the fragment)."""
    args = request.args
    form = {"model": args.get("model", ""), "group": args.get("group", ""),
            **{c: args.get(c, "") for c in (*TOKEN_CLASSES, "web_searches")}}
    calc, errors = None, {}
    if "model" in args:
        try:
            calc = groups.calculate(form["model"], form["group"], form)
        except groups.CatalogInputError as exc:
            errors = exc.errors
    table_groups, rows = groups.pricing_table()
    return render("pages/pricing.html", "pages/partials/calculator.html", status=422 if errors else 200,
                  table_groups=table_groups, rows=rows, models=[r.model for r in rows], form=form,
                  calc=calc, errors=errors, token_classes=TOKEN_CLASSES, class_labels=CLASS_LABELS)


@bp.route("/faq")
def faq():
    """The published FAQ, filtered by ?q= (htmx swaps only the list)."""
    q = faq_service.clean_query(request.args.get("q"))
    return render("pages/faq.html", "pages/partials/faq_list.html", entries=faq_service.entries(q), q=q,
                  render_md=faq_service.render_markdown)


@bp.route("/healthz")
def healthz():
    try:
        db.session.execute(text("SELECT 1"))
    except Exception:  # any database failure means unhealthy; the detail is in the log
        return jsonify(status="error", database="unreachable"), 503
    return jsonify(status="ok", database="ok")
