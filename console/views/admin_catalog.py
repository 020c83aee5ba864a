"""Admin: groups (multiplier, badge, models, limits), official model prices and FAQ entries.

Plain forms (boosted by htmx when JS is on): a valid POST redirects to the catalog, an
invalid one re-renders the form with 422. Every change is audited by the service.
"""
from __future__ import annotations

from flask import Blueprint, abort, request, url_for
from flask_login import current_user

from console import faq, groups, money
from console.authz import role_required
from console.hx import redirect, render

bp = Blueprint("admin_catalog", __name__, url_prefix="/admin/catalog")


@bp.route("/")
@role_required("admin")
def index():
    return render("admin_catalog/index.html", groups=groups.all_groups(), models=groups.all_models(),
                  entries=faq.entries(include_unpublished=True))


def _usd_text(micro_usd: int | None) -> str:
    return "" if micro_usd is None else money.format_fixed(micro_usd, min_places=2).replace(",", "")


def _group_form(group) -> dict:
    if group is None:
        return {"visible": "on", "badge": "none", "concurrency_limit": "10", "rpm_limit": "600",
                "sort_order": "0", "model_ids": []}
    return {"slug": group.slug, "name": group.name, "description": group.description,
            "multiplier": money.format_fixed(group.multiplier_ppm, min_places=0).replace(",", ""),
            "badge": group.badge, "concurrency_limit": str(group.concurrency_limit),
            "rpm_limit": str(group.rpm_limit), "sort_order": str(group.sort_order),
            "visible": "on" if group.visible else "", "model_ids": [str(m.id) for m in group.models]}


@bp.route("/groups/new", methods=["GET", "POST"], defaults={"group_id": None})
@bp.route("/groups/<int:group_id>", methods=["GET", "POST"])
@role_required("admin")
def group(group_id: int | None):
    try:
        current = groups.get_group(group_id) if group_id is not None else None
    except groups.NotFound:
        abort(404)
    form, errors = _group_form(current), {}
    if request.method == "POST":
        form = {**request.form.to_dict(), "model_ids": request.form.getlist("model_ids")}
        try:
            saved = groups.save_group(group_id, form, actor_id=current_user.id, model_ids=form["model_ids"])
        except groups.CatalogInputError as exc:
            errors = exc.errors
        else:
            return redirect(url_for("admin_catalog.index"), f"Group {saved.name} saved.")
    return render("admin_catalog/group_form.html", status=422 if errors else 200, group=current,
                  form=form, errors=errors, models=groups.all_models(), badges=groups.BADGES)


def _model_form(model) -> dict:
    if model is None:
        return {"provider": "openai", "kind": "chat", "enabled": "on", "max_output_tokens": "8192",
                "context_window": "128000", "sort_order": "0"}
    out = {"name": model.name, "provider": model.provider, "kind": model.kind,
           "max_output_tokens": str(model.max_output_tokens), "context_window": str(model.context_window),
           "sort_order": str(model.sort_order), "enabled": "on" if model.enabled else ""}
    for f in groups.PRICE_FIELDS:
        out[f] = _usd_text(getattr(model, f))
    out["long_context_threshold"] = str(model.long_context_threshold or "")
    for f in groups.RATIO_FIELDS:
        ppm = getattr(model, f)
        out[f] = "" if ppm is None else money.format_fixed(ppm, min_places=0).replace(",", "")
    return out


@bp.route("/models/new", methods=["GET", "POST"], defaults={"model_id": None})
@bp.route("/models/<int:model_id>", methods=["GET", "POST"])
@role_required("admin")
def model(model_id: int | None):
    try:
        current = groups.get_model(model_id) if model_id is not None else None
    except groups.NotFound:
        abort(404)
    form, errors = _model_form(current), {}
    if request.method == "POST":
        form = request.form.to_dict()
        try:
            saved = groups.save_model(model_id, form, actor_id=current_user.id)
        except groups.CatalogInputError as exc:
            errors = exc.errors
        else:
            return redirect(url_for("admin_catalog.index"), f"Prices of {saved.name} saved.")
    return render("admin_catalog/model_form.html", status=422 if errors else 200, model=current,
                  form=form, errors=errors, providers=groups.PROVIDERS, kinds=groups.MODEL_KINDS)


@bp.route("/faq/new", methods=["GET", "POST"], defaults={"entry_id": None})
@bp.route("/faq/<int:entry_id>", methods=["GET", "POST"])
@role_required("admin")
def faq_entry(entry_id: int | None):
    try:
        current = faq.get(entry_id) if entry_id is not None else None
    except faq.NotFound:
        abort(404)
    form = ({"slug": current.slug, "question": current.question, "answer_md": current.answer_md,
             "sort_order": str(current.sort_order), "published": "on" if current.published else ""}
            if current else {"published": "on", "sort_order": "0"})
    errors = {}
    if request.method == "POST":
        form = request.form.to_dict()
        try:
            saved = faq.save(entry_id, form, actor_id=current_user.id)
        except faq.FaqInputError as exc:
            errors = exc.errors
        else:
            return redirect(url_for("admin_catalog.index"), f"FAQ entry “{saved.question}” saved.")
    return render("admin_catalog/faq_form.html", status=422 if errors else 200, entry=current, form=form,
                  errors=errors, preview=faq.render_markdown(form.get("answer_md") or ""))


@bp.route("/faq/<int:entry_id>/delete", methods=["POST"])
@role_required("admin")
def faq_delete(entry_id: int):
    try:
        faq.remove(entry_id, actor_id=current_user.id)
    except faq.NotFound:
        abort(404)
    return redirect(url_for("admin_catalog.index"), "FAQ entry deleted.")
