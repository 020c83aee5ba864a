"""Relay routes (placeholder until the relay lands)."""
from console.relay import bp
from console.relay.errors import error_response


@bp.route("/models")
def models():
    return error_response(501, "The relay is not enabled yet.")
