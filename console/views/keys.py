"""API keys pages: list, create (secret shown once), rename, enable/disable, delete, roll,
limits and group. Each action works as a plain form (post/redirect/get) and in place with
htmx (row fragments plus a `keys-changed` event). Every lookup is owner-scoped: 404 on a miss.
"""
from __future__ import annotations

from flask import Blueprint, abort, request, url_for
from flask_login import current_user, login_required

from console import groups, keys, money
from console.hx import redirect, render, render_fragment, toast, trigger, wants_fragment

bp = Blueprint("keys", __name__, url_prefix="/keys")

KEY_FIELDS = ("expires", "spend_limit", "model_allowlist", "ip_allowlist")


@bp.context_processor
def _helpers():
    return {"key_status": keys.status_of, "split_list": keys.split_list}


def _owned(key_id: int):
    try:
        return keys.get_key(current_user.id, key_id)
    except keys.KeyNotFound:
        abort(404)


def _group_id(raw: str | None) -> int | None:
    """'' → the default group; anything not a small integer → an id no group has."""
    if not raw:
        return None
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 10 else -1


def _limits_form(key) -> dict[str, str]:
    return {
        "name": key.name,
        "expires": key.expires_at.date().isoformat() if key.expires_at else "",
        "spend_limit": money.format_fixed(key.spend_limit_micros, min_places=0).replace(",", "")
        if key.spend_limit_micros is not None else "",
        "model_allowlist": ", ".join(keys.split_list(key.model_allowlist)),
        "ip_allowlist": ", ".join(keys.split_list(key.ip_allowlist)),
    }


def _index_ctx(**extra) -> dict:
    return {"keys": keys.list_keys(current_user.id), "groups": groups.visible_groups(),
            "default_group": groups.default_group(current_user.id), "form": {}, "errors": {}, **extra}


def _secret_response(key, secret: str, *, created: bool):
    """The only response that ever carries a secret: never stored by browser or htmx history."""
    ctx = _index_ctx(new_key=key, secret=secret, created=created)
    if wants_fragment():
        template = "keys/partials/key_form.html" if created else "keys/partials/key_secret.html"
        resp = render_fragment(template, **ctx)
    else:
        resp = render("keys/secret.html", **ctx)
    resp.headers["Cache-Control"] = "no-store"
    trigger(resp, "keys-changed")
    return toast(resp, "Key created. Copy it now: it will not be shown again." if created
                 else "Key rolled. The old secret no longer works.")


@bp.route("/", methods=["GET"])
@login_required
def index():
    return render("keys/index.html", "keys/partials/key_list.html", **_index_ctx())


@bp.route("/", methods=["POST"])
@login_required
def create():
    form = {f: request.form.get(f, "") for f in ("name", "group_id", *KEY_FIELDS)}
    try:
        key, secret = keys.create_key(current_user.id, form["name"], group_id=_group_id(form["group_id"]),
                                      **{f: form[f] for f in KEY_FIELDS})
    except keys.KeyInputError as exc:
        return render("keys/index.html", "keys/partials/key_form.html", status=422,
                      **_index_ctx(form=form, errors=exc.errors))
    return _secret_response(key, secret, created=True)


@bp.route("/<int:key_id>", methods=["GET"])
@login_required
def edit(key_id: int):
    return render("keys/edit.html", "keys/partials/key_summary.html", **_edit_ctx(_owned(key_id)))


def _row(key, message: str):
    """Row actions in the list: the row re-rendered in place, or back to the list."""
    if wants_fragment():
        resp = render_fragment("keys/partials/key_row.html", key=key)
        trigger(resp, "keys-changed")
        return toast(resp, message)
    return redirect(url_for("keys.index"), message)


def _edit_ctx(key, **extra) -> dict:
    return {"key": key, "groups": groups.visible_groups(), "form": _limits_form(key), "errors": {}, **extra}


def _form_saved(key, fragment: str, message: str):
    """Edit-page forms: the fresh form in place (the summary refreshes on keys-changed)."""
    if wants_fragment():
        resp = render_fragment(fragment, **_edit_ctx(key))
        trigger(resp, "keys-changed")
        return toast(resp, message)
    return redirect(url_for("keys.edit", key_id=key.id), message)


@bp.route("/<int:key_id>/rename", methods=["POST"])
@login_required
def rename(key_id: int):
    key = _owned(key_id)
    name = request.form.get("name", "")
    try:
        key = keys.rename(current_user.id, key.id, name)
    except keys.KeyInputError as exc:
        ctx = _edit_ctx(key, errors=exc.errors)
        ctx["form"]["name"] = name
        return render("keys/edit.html", "keys/partials/key_rename_form.html", status=422, **ctx)
    return _form_saved(key, "keys/partials/key_rename_form.html", "Key renamed.")


@bp.route("/<int:key_id>/disable", methods=["POST"])
@login_required
def disable(key_id: int):
    key = keys.set_enabled(current_user.id, _owned(key_id).id, False)
    return _row(key, "Key disabled. It stops working at once.")


@bp.route("/<int:key_id>/enable", methods=["POST"])
@login_required
def enable(key_id: int):
    key = keys.set_enabled(current_user.id, _owned(key_id).id, True)
    return _row(key, "Key enabled.")


@bp.route("/<int:key_id>/delete", methods=["POST"])
@login_required
def delete(key_id: int):
    keys.delete(current_user.id, _owned(key_id).id)
    message = "Key deleted. It stops working at once."
    if wants_fragment():
        resp = render_fragment("keys/partials/key_deleted.html")  # the row is swapped for nothing
        trigger(resp, "keys-changed")
        return toast(resp, message)
    return redirect(url_for("keys.index"), message)


@bp.route("/<int:key_id>/roll", methods=["POST"])
@login_required
def roll(key_id: int):
    key, secret = keys.roll(current_user.id, _owned(key_id).id)
    return _secret_response(key, secret, created=False)


@bp.route("/<int:key_id>/limits", methods=["POST"])
@login_required
def limits(key_id: int):
    key = _owned(key_id)
    form = {f: request.form.get(f, "") for f in KEY_FIELDS}
    try:
        key = keys.update_limits(current_user.id, key.id, **form)
    except keys.KeyInputError as exc:
        return render("keys/edit.html", "keys/partials/key_limits_form.html", status=422,
                      **_edit_ctx(key, form=form, errors=exc.errors))
    return _form_saved(key, "keys/partials/key_limits_form.html", "Limits saved.")


@bp.route("/<int:key_id>/group", methods=["POST"])
@login_required
def move(key_id: int):
    key = _owned(key_id)
    try:
        key = keys.move_to_group(current_user.id, key.id, _group_id(request.form.get("group_id")) or -1)
    except keys.GroupNotAvailable:
        errors = {"group_id": "Pick one of the listed groups."}
    except keys.KeyInputError as exc:
        errors = exc.errors
    else:
        return _form_saved(key, "keys/partials/key_group_form.html", f"Key moved to {key.group.name}.")
    return render("keys/edit.html", "keys/partials/key_group_form.html", status=422,
                  **_edit_ctx(key, errors=errors))
