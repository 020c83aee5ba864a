"""Admin pages: vouchers, groups, prices, channels, FAQ, settings."""
from __future__ import annotations

from flask import Blueprint

from console.authz import role_required
from console.hx import render

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.route("/")
@role_required("admin")
def index():
    return render("pages/placeholder.html", title="Admin")
