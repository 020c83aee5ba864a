"""Public and home pages: landing or dashboard, pricing, FAQ, health check."""
from __future__ import annotations

from flask import Blueprint, jsonify
from flask_login import current_user
from sqlalchemy import text

from console.extensions import db
from console.hx import render

bp = Blueprint("pages", __name__)


@bp.route("/")
def home():
    if current_user.is_authenticated:
        return render("pages/dashboard.html")
    return render("pages/landing.html")


@bp.route("/pricing")
def pricing():
    return render("pages/placeholder.html", title="Pricing")


@bp.route("/faq")
def faq():
    return render("pages/placeholder.html", title="FAQ")


@bp.route("/healthz")
def healthz():
    try:
        db.session.execute(text("SELECT 1"))
    except Exception:  # any database failure means unhealthy; the detail is in the log
        return jsonify(status="error", database="unreachable"), 503
    return jsonify(status="ok", database="ok")
