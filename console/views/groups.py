"""Group picker: one card per visible group; set the account default or move a key there."""
from __future__ import annotations

from flask import Blueprint, abort, request, url_for
from flask_login import current_user, login_required

from console import groups, keys
from console.hx import redirect, render, render_fragment, toast, trigger, wants_fragment

bp = Blueprint("groups", __name__, url_prefix="/groups")


def _ctx(**extra) -> dict:
    return {"cards": groups.cards(current_user.id), "keys": keys.list_keys(current_user.id),
            "errors": {}, **extra}


def _done(message: str, event: str):
    if wants_fragment():
        resp = render_fragment("groups/partials/group_cards.html", **_ctx())
        trigger(resp, event)
        return toast(resp, message)
    return redirect(url_for("groups.index"), message)


@bp.route("/")
@login_required
def index():
    return render("groups/index.html", "groups/partials/group_cards.html", **_ctx())


@bp.route("/<int:group_id>/default", methods=["POST"])
@login_required
def make_default(group_id: int):
    try:
        group = groups.set_default_group(current_user.id, group_id)
    except groups.GroupNotAvailable:
        abort(404)
    return _done(f"{group.name} is now your default group for new keys.", "default-group-changed")


@bp.route("/<int:group_id>/assign", methods=["POST"])
@login_required
def assign(group_id: int):
    raw = request.form.get("key_id", "")
    key_id = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 10 else None
    try:
        group = groups.get_visible(group_id)
        if key_id is None:
            raise keys.KeyInputError({"key_id": "Pick one of your keys."})
        key = keys.move_to_group(current_user.id, key_id, group.id)
    except (groups.GroupNotAvailable, keys.KeyNotFound):
        abort(404)
    except keys.KeyInputError as exc:
        errors = {group_id: next(iter(exc.errors.values()))}
        return render("groups/index.html", "groups/partials/group_cards.html", status=422,
                      **_ctx(errors=errors))
    return _done(f"Key “{key.name}” moved to {group.name}.", "keys-changed")
