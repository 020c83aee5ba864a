"""Admin: upstream channels — list, add (the secret is write-only), enable/disable."""
from __future__ import annotations

import re

from flask import Blueprint, abort, url_for
from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField

from console import channels
from console.authz import role_required
from console.hx import redirect, render, toast, wants_fragment

bp = Blueprint("admin_channels", __name__, url_prefix="/admin/channels")

_INT = re.compile(r"-?[0-9]{1,4}")


class ChannelForm(FlaskForm):
    name = StringField("Name")
    type = StringField("Type", default="openai")  # a <select> in the template; validated by the service
    base_url = StringField("Base URL")
    api_key = PasswordField("Upstream API key")  # never rendered back
    models = StringField("Models (m1, public=upstream, …)")
    groups = StringField("Groups (slugs; blank = all)")
    priority = StringField("Priority", default="0")
    weight = StringField("Weight", default="1")


class StatusForm(FlaskForm):
    pass


def _index(form: ChannelForm, *, error: str | None = None, status: int = 200, list_oob: bool = False):
    return render("admin_channels/index.html", "admin_channels/partials/channel_form.html",
                  status=status, form=form, error=error, channels=channels.list_channels(),
                  list_oob=list_oob)


@bp.route("/")
@role_required("admin")
def index():
    return _index(ChannelForm(formdata=None))


@bp.route("/", methods=["POST"])
@role_required("admin")
def create():
    form = ChannelForm()
    prio, weight = form.priority.data or "", form.weight.data or ""
    try:
        if not _INT.fullmatch(prio) or not _INT.fullmatch(weight):
            raise channels.ChannelError("Priority and weight must be whole numbers.")
        ch = channels.create_channel(
            name=form.name.data or "", type=form.type.data or "", base_url=form.base_url.data or "",
            api_key=form.api_key.data or "", models=form.models.data or "",
            groups=form.groups.data or "", priority=int(prio), weight=int(weight))
    except channels.ChannelError as exc:
        form.api_key.data = ""
        return _index(form, error=str(exc), status=422)
    message = f"Channel {ch.name} added."
    if wants_fragment():
        # The fresh form, plus the list out of band so the new channel shows at once.
        return toast(_index(ChannelForm(formdata=None), list_oob=True), message)
    return redirect(url_for("admin_channels.index"), message)


@bp.route("/<int:channel_id>/<any(disable, enable):action>", methods=["POST"])
@role_required("admin")
def set_status(channel_id: int, action: str):
    StatusForm()  # CSRF is checked globally; the form has no fields
    try:
        ch = channels.set_enabled(channel_id, action == "enable")
    except LookupError:
        abort(404)
    message = f"Channel {ch.name} {action}d."
    if wants_fragment():
        return toast(render("admin_channels/index.html", "admin_channels/partials/channel_list.html",
                            form=ChannelForm(formdata=None), error=None,
                            channels=channels.list_channels()), message)
    return redirect(url_for("admin_channels.index"), message)
