"""Admin: voucher batches — mint (codes shown or downloaded once), list, disable/enable."""
from __future__ import annotations

import base64
import re

from flask import Blueprint, abort, make_response, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import HiddenField, StringField

from console import money, vouchers
from console.authz import role_required
from console.hx import redirect, render, toast, wants_fragment

bp = Blueprint("admin_vouchers", __name__, url_prefix="/admin/vouchers")

_COUNT = re.compile(r"[0-9]{1,5}")
_DAYS = re.compile(r"[0-9]{1,4}")


class MintForm(FlaskForm):
    count = StringField("Number of codes")
    value = StringField("Face value (credits)")
    expires_days = StringField("Expires after (days, blank = never)")
    note = StringField("Note (internal)")
    output = HiddenField()


class StatusForm(FlaskForm):
    pass


def _parse_mint(form: MintForm) -> dict:
    """Raw-string checks before any conversion; raises VoucherError/MoneyError with a message."""
    count = (form.count.data or "")
    if not _COUNT.fullmatch(count):
        raise vouchers.VoucherError(f"Enter a number of codes from 1 to {vouchers.MAX_BATCH:,}.")
    days = form.expires_days.data or ""
    if days and not _DAYS.fullmatch(days):
        raise vouchers.VoucherError(f"Enter expiry days from 1 to {vouchers.MAX_EXPIRY_DAYS}, or leave it blank.")
    return {
        "count": int(count),
        "value_micros": money.parse_credits(form.value.data or ""),
        "expires_at": vouchers.expiry_from_days(int(days) if days else None),
        "note": form.note.data or "",
    }


def _index(form: MintForm, *, error: str | None = None, status: int = 200):
    return render("admin_vouchers/index.html", "admin_vouchers/partials/batch_table.html",
                  status=status, form=form, error=error, batches=vouchers.list_batches(),
                  status_form=StatusForm())


@bp.route("/")
@role_required("admin")
def index():
    return _index(MintForm(formdata=None))


@bp.route("/", methods=["POST"])
@role_required("admin")
def mint():
    form = MintForm()
    try:
        batch, codes = vouchers.mint_batch(actor_id=current_user.id, **_parse_mint(form))
    except (vouchers.VoucherError, money.MoneyError) as exc:
        return _index(form, error=str(exc), status=422)
    csv_text = vouchers.codes_csv(codes, batch.face_value_micros, batch.expires_at)
    filename = f"vouchers-batch-{batch.id}.csv"
    if form.output.data == "csv":
        resp = make_response(csv_text, 200)
        resp.headers["Content-Type"] = "text/csv; charset=utf-8"
        resp.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    else:
        # The one time these codes are visible: a data: link downloads the same CSV without
        # the server keeping a copy.
        data_uri = "data:text/csv;base64," + base64.b64encode(csv_text.encode()).decode()
        resp = render("admin_vouchers/minted.html", batch=batch, codes=codes,
                      data_uri=data_uri, filename=filename)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.route("/<int:batch_id>/<any(disable, enable):action>", methods=["POST"])
@role_required("admin")
def set_status(batch_id: int, action: str):
    StatusForm()  # CSRF is checked globally; the form has no fields
    status = "disabled" if action == "disable" else "active"
    try:
        vouchers.set_batch_status(batch_id, status, actor_id=current_user.id)
    except LookupError:
        abort(404)
    message = f"Batch {batch_id} {'disabled' if status == 'disabled' else 're-enabled'}."
    if wants_fragment():
        return toast(_index(MintForm(formdata=None)), message)
    return redirect(url_for("admin_vouchers.index"), message)
