"""Idempotent seeding: groups, official prices, FAQ, and (with --demo) demo accounts."""
from __future__ import annotations

from sqlalchemy import func, select

from console import accounts, ledger
from console.database import write_tx
from console.extensions import db
from console.models import ApiKey, FaqEntry, Group, GroupModel, LedgerEntry, ModelPrice, User
from console.money import parse_multiplier, parse_usd
from console.seed_data import FAQ, GROUPS, LONG_CONTEXT, MODELS, WEB_SEARCH_USD

DEMO_ADMIN = ("admin@example.com", "admin-demo-password")
DEMO_USER = ("demo@example.com", "demo-user-password")
DEMO_CREDITS_MICROS = 100 * 1_000_000
DEMO_KEY_NAME = "demo"


def _usd(v: str | None) -> int | None:
    return None if v is None else parse_usd(v)


def _long_context(name: str) -> dict:
    if name not in LONG_CONTEXT:
        return {}
    threshold, up, out = LONG_CONTEXT[name]
    return {"long_context_threshold": threshold, "long_context_input_ppm": parse_multiplier(up),
            "long_context_output_ppm": parse_multiplier(out)}


def seed_reference() -> None:
    """Models, groups and FAQ; existing rows (edited by admins) are left alone."""
    with write_tx():
        existing = set(db.session.scalars(select(ModelPrice.name)))
        for i, (name, provider, kind, inp, out, cw5, cw1, cr, max_out, ctx) in enumerate(MODELS):
            if name in existing:
                continue
            db.session.add(ModelPrice(
                name=name, provider=provider, kind=kind, input_price=parse_usd(inp),
                output_price=parse_usd(out), cache_write_5m_price=_usd(cw5),
                cache_write_1h_price=_usd(cw1), cache_read_price=_usd(cr),
                web_search_price=_usd(WEB_SEARCH_USD.get(name)), **_long_context(name),
                max_output_tokens=max_out, context_window=ctx, sort_order=i,
            ))
        db.session.flush()
        by_name = {m.name: m.id for m in db.session.scalars(select(ModelPrice))}
        have = set(db.session.scalars(select(Group.slug)))
        for slug, name, desc, mult, badge, conc, rpm, models, order in GROUPS:
            if slug in have:
                continue
            group = Group(slug=slug, name=name, description=desc, multiplier_ppm=parse_multiplier(mult),
                          badge=badge, concurrency_limit=conc, rpm_limit=rpm, visible=True, sort_order=order)
            db.session.add(group)
            db.session.flush()
            for model_name in models or by_name:
                db.session.add(GroupModel(group_id=group.id, model_id=by_name[model_name]))
        have_faq = set(db.session.scalars(select(FaqEntry.slug)))
        for i, (slug, question, answer) in enumerate(FAQ):
            if slug not in have_faq:
                db.session.add(FaqEntry(slug=slug, question=question, answer_md=answer, sort_order=i))


def _ensure_user(email: str, password: str, role: str) -> User:
    user = db.session.scalar(select(User).where(User.email == email))
    return user or accounts.create_user(email, password, role)


def seed_demo() -> list[tuple[str, str, str]]:
    """Demo admin and user (with a 100-credit balance granted once). Returns printed logins."""
    seed_reference()
    admin = _ensure_user(*DEMO_ADMIN, "admin")
    user = _ensure_user(*DEMO_USER, "user")
    if user.default_group_id is None:
        with write_tx():
            u = db.session.get(User, user.id)
            u.default_group_id = db.session.scalar(select(Group.id).where(Group.slug == "recommended"))
    has_entries = db.session.scalar(select(func.count()).select_from(LedgerEntry).where(LedgerEntry.user_id == user.id))
    if not has_entries:
        ledger.adjust(user.id, DEMO_CREDITS_MICROS, actor_id=admin.id, reason="demo seed balance")
    _demo_channels()
    return [("admin", *DEMO_ADMIN), ("user", *DEMO_USER), ("key", DEMO_USER[0], _demo_key(user.id))]


def _demo_channels() -> None:
    """With DEMO_UPSTREAM_URL (set by `make run`): channels to the built-in fake upstream, once."""
    import os

    from console import channels
    from console.models import Channel

    base = os.environ.get("DEMO_UPSTREAM_URL")
    if not base or db.session.scalar(select(Channel.id).where(Channel.name == "demo-openai")):
        return
    models = list(db.session.execute(select(ModelPrice.name, ModelPrice.provider, ModelPrice.kind)))
    openai_models = ",".join(f"{n}={'fake-embedding-model' if k == 'embedding' else 'fake-model'}"
                             for n, p, k in models if p == "openai")
    anthropic_models = ",".join(f"{n}=fake-model" for n, p, _k in models if p == "anthropic")
    channels.create_channel(name="demo-openai", type="openai", base_url=f"{base}/v1",
                            api_key="demo-upstream-key", models=openai_models)
    channels.create_channel(name="demo-anthropic", type="anthropic", base_url=base,
                            api_key="demo-upstream-key", models=anthropic_models)


def _demo_key(user_id: int) -> str:
    """The demo user's key: created once, then rolled on every run (secrets are not stored)."""
    from console import keys

    existing = db.session.scalar(select(ApiKey.id).where(
        ApiKey.user_id == user_id, ApiKey.name == DEMO_KEY_NAME, ApiKey.deleted_at.is_(None)))
    if existing is not None:
        return keys.roll(user_id, existing)[1]
    return keys.create_key(user_id, DEMO_KEY_NAME)[1]
