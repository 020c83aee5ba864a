"""The relay (/v1): authenticates by API key, forwards to upstream channels, bills each call."""
from flask import Blueprint

bp = Blueprint("relay", __name__, url_prefix="/v1")

from console.relay import routes  # noqa: E402,F401  (routes attach to bp)
