"""The FAQ: published entries, search, admin editing, and safe markdown rendering.

Answers are markdown written by staff, rendered with `markdown` and then sanitised by nh3
against an allowlist (no raw HTML survives that is not on it, no style, no script, links
get rel="noopener noreferrer nofollow"), so even a compromised admin cannot store XSS.
"""
from __future__ import annotations

import re
import unicodedata

import markdown as md
import nh3
from markupsafe import Markup
from sqlalchemy import or_, select

from console import audit
from console.database import write_tx
from console.extensions import db
from console.models import FaqEntry, utcnow

QUERY_MAX = 100
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,79}")

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "b", "i", "code", "pre", "blockquote", "ul", "ol", "li",
    "a", "table", "thead", "tbody", "tr", "th", "td", "h3", "h4", "h5", "h6", "del",
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "th": {"align"}, "td": {"align"}}
URL_SCHEMES = {"http", "https", "mailto"}


class FaqInputError(ValueError):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


class NotFound(LookupError):
    pass


def render_markdown(text: str) -> Markup:
    """Markdown → sanitised HTML, safe to insert into the page."""
    html = md.markdown(text or "", extensions=["tables", "sane_lists"], output_format="html")
    clean = nh3.clean(html, tags=ALLOWED_TAGS, attributes=ALLOWED_ATTRIBUTES, url_schemes=URL_SCHEMES,
                      link_rel="noopener noreferrer nofollow", strip_comments=True)
    return Markup(clean)  # sanitised by nh3 just above


def clean_query(raw: object) -> str:
    q = raw.strip() if isinstance(raw, str) else ""
    return "".join(ch for ch in q[:QUERY_MAX] if unicodedata.category(ch)[0] != "C")


def entries(query: str = "", *, include_unpublished: bool = False) -> list[FaqEntry]:
    """Entries in display order; `query` matches question or answer, case-insensitively."""
    stmt = select(FaqEntry).order_by(FaqEntry.sort_order, FaqEntry.id)
    if not include_unpublished:
        stmt = stmt.where(FaqEntry.published.is_(True))
    if query:
        # autoescape: a user's % or _ is a literal, not a wildcard.
        stmt = stmt.where(or_(FaqEntry.question.icontains(query, autoescape=True),
                              FaqEntry.answer_md.icontains(query, autoescape=True)))
    return list(db.session.scalars(stmt))


def get(entry_id: int) -> FaqEntry:
    entry = db.session.get(FaqEntry, entry_id)
    if entry is None:
        raise NotFound(entry_id)
    return entry


def save(entry_id: int | None, form: dict, *, actor_id: int) -> FaqEntry:
    """Create or update an entry from raw form strings; audited."""
    errors: dict[str, str] = {}
    slug = (form.get("slug") or "").strip()
    if not _SLUG.fullmatch(slug):
        errors["slug"] = "Lowercase letters, digits and dashes (the anchor); at most 80."
    question = (form.get("question") or "").strip()
    if not question or len(question) > 300:
        errors["question"] = "Write the question (at most 300 characters)."
    answer = (form.get("answer_md") or "").replace("\r\n", "\n").strip()
    if not answer or len(answer) > 20_000:
        errors["answer_md"] = "Write the answer (markdown, at most 20,000 characters)."
    order_raw = (form.get("sort_order") or "0").strip()
    if not re.fullmatch(r"-?[0-9]{1,6}", order_raw):
        errors["sort_order"] = "Enter a whole number."
    clash = db.session.scalar(select(FaqEntry.id).where(FaqEntry.slug == slug))
    if clash is not None and clash != entry_id:
        errors["slug"] = "Another entry uses this anchor."
    if errors:
        raise FaqInputError(errors)
    with write_tx():
        entry = FaqEntry() if entry_id is None else get(entry_id)
        before = None if entry_id is None else {"slug": entry.slug, "question": entry.question,
                                                "answer_md": entry.answer_md, "published": entry.published}
        entry.slug, entry.question, entry.answer_md = slug, question, answer
        entry.sort_order = int(order_raw)
        entry.published = form.get("published") in ("1", "on", "true", "y")
        entry.updated_at = utcnow()
        if entry_id is None:
            db.session.add(entry)
        db.session.flush()
        audit.record("catalog.faq_saved", actor_id=actor_id, target_type="faq", target_id=entry.id,
                     before=before, after={"slug": slug, "question": question, "answer_md": answer,
                                           "published": entry.published})
    return entry


def remove(entry_id: int, *, actor_id: int) -> None:
    with write_tx():
        entry = get(entry_id)
        audit.record("catalog.faq_deleted", actor_id=actor_id, target_type="faq", target_id=entry.id,
                     before={"slug": entry.slug, "question": entry.question, "answer_md": entry.answer_md})
        db.session.delete(entry)
