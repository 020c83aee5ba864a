"""Wallet pages (placeholder until the feature lands)."""
from __future__ import annotations

from flask import Blueprint
from flask_login import login_required

from console.hx import render

bp = Blueprint("wallet", __name__, url_prefix="/wallet")


@bp.route("/")
@login_required
def index():
    return render("pages/placeholder.html", title="Wallet")
