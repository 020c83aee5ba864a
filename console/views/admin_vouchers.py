"""Admin: Voucher batches (placeholder until the feature lands)."""
from __future__ import annotations

from flask import Blueprint

from console.authz import role_required
from console.hx import render

bp = Blueprint("admin_vouchers", __name__, url_prefix="/admin/vouchers")


@bp.route("/")
@role_required("admin")
def index():
    return render("pages/placeholder.html", title="Voucher batches")
