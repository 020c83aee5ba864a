"""Register, log in, log out, change password."""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, current_app, redirect, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired, Length

from console import accounts
from console.extensions import limiter
from console.hx import redirect as hx_redirect
from console.hx import render

bp = Blueprint("auth", __name__)


class LoginForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=accounts.PASSWORD_MAX)])


class RegisterForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Length(max=254)])
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(min=accounts.PASSWORD_MIN, max=accounts.PASSWORD_MAX)]
    )


class PasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired()])
    new = PasswordField(
        "New password", validators=[DataRequired(), Length(min=accounts.PASSWORD_MIN, max=accounts.PASSWORD_MAX)]
    )


def safe_next(target: str | None) -> str:
    """Only local paths: no scheme, no host, no '//' or backslash tricks."""
    if target and "\\" not in target and not any(ord(c) < 32 for c in target):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and not target.startswith("//"):
            return target
    return url_for("pages.home")


def _login_account_key() -> str:
    return "login-account:" + (request.form.get("email") or "").strip().lower()[:254]


def _failed(resp) -> bool:
    # Only failed attempts count towards the limits (a success redirects).
    return resp.status_code != 302


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["LOGIN_IP_LIMITS"],
               methods=["POST"], deduct_when=_failed)
@limiter.limit(lambda: current_app.config["LOGIN_LIMITS"],
               key_func=_login_account_key, methods=["POST"], deduct_when=_failed)
def login():
    form = LoginForm()
    error = None
    if form.validate_on_submit():
        user = accounts.authenticate(form.email.data, form.password.data, ip=request.remote_addr)
        if user is not None:
            nxt = safe_next(request.args.get("next"))
            session.clear()  # no pre-login state (or CSRF token) survives the login
            login_user(user)
            return redirect(nxt)
        error = "Wrong e-mail or password."
    status = 422 if request.method == "POST" else 200
    return render("auth/login.html", "auth/partials/login_form.html", form=form, error=error, status=status)


@bp.route("/register", methods=["GET", "POST"])
@limiter.limit("20 per hour", methods=["POST"])
def register():
    form = RegisterForm()
    error = None
    if form.validate_on_submit():
        try:
            user = accounts.create_user(form.email.data, form.password.data, ip=request.remote_addr)
        except accounts.AccountError as exc:
            error = str(exc)
        else:
            session.clear()
            login_user(user)
            return redirect(url_for("pages.home"))
    status = 422 if request.method == "POST" else 200
    return render("auth/register.html", "auth/partials/register_form.html", form=form, error=error, status=status)


@bp.route("/logout", methods=["POST"])
@login_required
def logout():
    accounts.rotate_session(current_user.id, reason="auth.logout", ip=request.remote_addr)
    logout_user()
    session.clear()
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@login_required
def password():
    form = PasswordForm()
    error = None
    if form.validate_on_submit():
        try:
            accounts.change_password(current_user.id, form.current.data, form.new.data, ip=request.remote_addr)
        except accounts.AccountError as exc:
            error = str(exc)
        else:
            # The rotated token logged out every other session; keep this one signed in.
            user = current_user._get_current_object()
            session.clear()
            login_user(user)
            return hx_redirect(url_for("pages.home"), "Password changed. Other sessions were signed out.")
    status = 422 if request.method == "POST" else 200
    return render("auth/password.html", form=form, error=error, status=status)
