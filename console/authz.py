"""Role gates for views: user < support < admin."""
from __future__ import annotations

from functools import wraps

from flask import abort
from flask_login import current_user, login_required

RANK = {"user": 0, "support": 1, "admin": 2}


def role_required(role: str):
    """Staff routes: a logged-in user below `role` gets 404 (the route is not advertised)."""
    def deco(view):
        @wraps(view)
        @login_required
        def wrapped(*args, **kwargs):
            if RANK.get(current_user.role, -1) < RANK[role]:
                abort(404)
            return view(*args, **kwargs)
        wrapped.required_role = role
        return wrapped
    return deco
