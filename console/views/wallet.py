"""Wallet: balance, held and available; ledger history; voucher redemption (throttled)."""
from __future__ import annotations

import re

from flask import Blueprint, abort, current_app, make_response, render_template, request, url_for
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from wtforms import StringField

from console import ledger, money, settings, vouchers
from console.extensions import limiter
from console.hx import is_htmx, redirect, render, toast, trigger, wants_fragment

bp = Blueprint("wallet", __name__, url_prefix="/wallet")

_KEYSET = re.compile(r"[0-9]{1,18}")
THROTTLED = "Too many redemption attempts. Wait a few minutes and try again."


class RedeemForm(FlaskForm):
    # Validation is vouchers.normalize_code's job (alphabet, length), before any lookup.
    code = StringField("Voucher code")


def _user_key() -> str:
    return f"redeem-user:{getattr(current_user, 'id', 'anonymous')}"


def _user_limits() -> str:
    return current_app.config["REDEEM_LIMITS"]


def _ip_limits() -> str:
    return current_app.config.get("REDEEM_IP_LIMITS") or current_app.config["REDEEM_LIMITS"]


def _failed(resp) -> bool:
    # Only failed attempts count: guessing is what the limits stop, not redeeming a stack of cards.
    return resp.status_code >= 400


def _page(form: RedeemForm, *, error: str | None = None, status: int = 200, before: int | None = None):
    return render(
        "wallet/index.html", "wallet/partials/ledger_history.html", status=status,
        form=form, error=error, wallet=ledger.wallet_of(current_user.id),
        history=ledger.history(current_user.id, before=before), before=before,
    )


@bp.route("/")
@login_required
def index():
    raw = request.args.get("before")
    before = None
    if raw is not None:
        if not _KEYSET.fullmatch(raw):
            abort(400, description="The page marker must be a positive whole number.")
        before = int(raw)
    return _page(RedeemForm(), before=before)


@bp.route("/redeem", methods=["POST"])
@login_required
@limiter.limit(_user_limits, key_func=_user_key, methods=["POST"], deduct_when=_failed)
@limiter.limit(_ip_limits, methods=["POST"], deduct_when=_failed)
def redeem():
    form = RedeemForm()
    try:
        result = vouchers.redeem(current_user.id, form.code.data or "")
    except vouchers.VoucherError as exc:
        if wants_fragment():
            return render("wallet/index.html", "wallet/partials/redeem_form.html", status=422,
                          form=form, error=str(exc))
        return _page(form, error=str(exc), status=422)
    symbol = settings.get("currency_symbol")
    message = (f"Redeemed {money.format_credits(result.value_micros, symbol)}. "
               f"Balance: {money.format_credits(result.balance_micros, symbol)}.")
    if not is_htmx() or not wants_fragment():
        return redirect(url_for("wallet.index"), message)
    # The form comes back empty; the nav badge and the summary update out of band, and the
    # history table re-fetches itself on `wallet-changed`.
    wallet = ledger.wallet_of(current_user.id)
    html = (render_template("wallet/partials/redeem_form.html", form=RedeemForm(formdata=None))
            + render_template("partials/balance_badge.html", oob=True)
            + render_template("wallet/partials/wallet_summary.html", wallet=wallet, oob=True))
    resp = make_response(html, 200)
    resp.vary.add("HX-Request")
    trigger(resp, "wallet-changed")
    return toast(resp, message)


@bp.errorhandler(429)
def throttled(_exc):
    if is_htmx():
        # htmx does not swap a 429, but it still fires the HX-Trigger events.
        resp = make_response(THROTTLED, 429)
        return toast(resp, THROTTLED, "error")
    return _page(RedeemForm(formdata=None), error=THROTTLED, status=429)
