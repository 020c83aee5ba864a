"""The relay (/v1): authenticates by API key, forwards to upstream channels, bills each call."""
import os

from flask import Blueprint, current_app

bp = Blueprint("relay", __name__, url_prefix="/v1")

# Relay tunables that console/config.py does not define: app.config wins, then the environment.
DEFAULTS = {"RELAY_MAX_ATTEMPTS": 3, "RELAY_RETRY_BASE_S": 0.2, "RELAY_RETRY_AFTER_MAX_S": 5.0,
            "RELAY_CHECKPOINT_S": 5.0}


def setting(name: str) -> float:
    value = current_app.config.get(name)
    if value is None:
        value = os.environ.get(name, DEFAULTS[name])
    return float(value)


from console.relay import routes  # noqa: E402,F401  (routes attach to bp)
