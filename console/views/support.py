"""Support console: account lookup and fixes (placeholder until the staff issue lands)."""
from __future__ import annotations

from flask import Blueprint

from console.authz import role_required
from console.hx import render

bp = Blueprint("support", __name__, url_prefix="/support")


@bp.route("/")
@role_required("support")
def index():
    return render("pages/placeholder.html", title="Support")
