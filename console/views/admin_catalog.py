"""Admin: Groups, prices and FAQ (placeholder until the feature lands)."""
from __future__ import annotations

from flask import Blueprint

from console.authz import role_required
from console.hx import render

bp = Blueprint("admin_catalog", __name__, url_prefix="/admin/catalog")


@bp.route("/")
@role_required("admin")
def index():
    return render("pages/placeholder.html", title="Groups, prices and FAQ")
