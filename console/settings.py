"""Site settings (purchase link, support contact, currency symbol, exchange rate…) with defaults."""
from __future__ import annotations

from flask import g, has_app_context
from sqlalchemy import select

from console.database import write_tx
from console.extensions import db
from console.models import SiteSetting

DEFAULTS: dict[str, str] = {
    "site_name": "Relay Console",
    "currency_symbol": "¥",
    # Local money per USD, for "≈ 4.3% of official price" on group cards. Display only.
    "exchange_rate": "7",
    "purchase_url": "",
    "support_contact": "",
}


def all_settings() -> dict[str, str]:
    """Defaults overlaid with stored values; cached for the request."""
    if has_app_context() and "site_settings" in g:
        return g.site_settings
    values = dict(DEFAULTS)
    values.update({k: v for k, v in db.session.execute(select(SiteSetting.key, SiteSetting.value))})
    if has_app_context():
        g.site_settings = values
    return values


def get(key: str) -> str:
    return all_settings().get(key, DEFAULTS.get(key, ""))


def put(key: str, value: str) -> None:
    with write_tx():
        row = db.session.get(SiteSetting, key)
        if row is None:
            db.session.add(SiteSetting(key=key, value=value))
        else:
            row.value = value
    if has_app_context():
        g.pop("site_settings", None)
