"""FAQ: public page with anchors, search (htmx and plain GET), sanitised markdown, admin editing."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from console import faq, seed
from console.extensions import db
from console.models import AuditLog, FaqEntry
from tests.support.web import HX, login, make_user, page_token


@pytest.fixture
def seeded(ctx):
    seed.seed_reference()
    return ctx


def test_faq_is_public_with_anchors_and_the_partial_call_policy(seeded, client):
    """Every published entry renders with an anchor; the partial-call billing table is rendered as a table."""
    resp = client.get("/faq")
    html = resp.data.decode()
    assert resp.status_code == 200 and "<html" in html
    for entry in db.session.scalars(select(FaqEntry)):
        assert f'id="{entry.slug}"' in html and f'href="#{entry.slug}"' in html
    policy = html.split('id="partial-calls"')[1].split("</section>")[0]
    assert "<table>" in policy and "disconnected mid-stream" in policy
    assert "nothing; the record is kept as failed" in policy


def test_search_filters_with_and_without_htmx(seeded, client):
    """?q= filters questions and answers: the full page without JS, only #faq-list for htmx."""
    full = client.get("/faq?q=INVOICE")
    assert full.status_code == 200 and b"<html" in full.data
    assert b'id="invoices"' in full.data and b'id="stability"' not in full.data
    frag = client.get("/faq?q=invoice", headers=HX)
    assert frag.data.lstrip().startswith(b'<div id="faq-list"') and b"<html" not in frag.data
    assert b'id="invoices"' in frag.data
    none = client.get("/faq?q=100%25", headers=HX)  # '%' is a literal, not a LIKE wildcard
    assert b"No question matches" in none.data
    long = client.get("/faq?q=" + "x" * 5000)
    assert long.status_code == 200


def test_markdown_is_sanitised():
    """Scripts, event handlers, styles and javascript: links are removed; links get rel=nofollow etc."""
    out = str(faq.render_markdown(
        "**bold** [ok](https://example.com) [bad](javascript:alert(1))\n\n"
        "<script>alert(1)</script><img src=x onerror=alert(1)><p style=\"color:red\" onclick=\"x()\">hi</p>"
        "<iframe src=https://evil.example></iframe>"))
    assert "<strong>bold</strong>" in out
    assert 'href="https://example.com" rel="noopener noreferrer nofollow"' in out
    for bad in ("<script", "alert(1)", "onerror", "onclick", "style=", "javascript:", "<iframe", "<img"):
        assert bad not in out, bad


def test_admin_edits_faq_and_visitors_see_it(ctx, client):
    """An admin adds an entry (422 on an empty question); the public page shows it sanitised; delete works."""
    make_user("admin@example.com", role="admin")
    login(client, "admin@example.com")
    token = page_token(client, "/admin/catalog/faq/new")
    form = {"csrf_token": token, "slug": "refunds", "question": "Can I get a refund?",
            "answer_md": "Yes, see [support](https://example.com).<script>x()</script>", "sort_order": "1",
            "published": "on"}
    resp = client.post("/admin/catalog/faq/new", data={**form, "question": " "})
    assert resp.status_code == 422 and b"Write the question" in resp.data
    assert client.post("/admin/catalog/faq/new", data={**form, "slug": "Bad Slug!"}).status_code == 422
    assert client.post("/admin/catalog/faq/new", data=form).status_code == 302
    entry_id = db.session.scalar(select(FaqEntry.id).where(FaqEntry.slug == "refunds"))
    public = client.get("/faq").data.decode()
    assert 'id="refunds"' in public and "<script>x()" not in public and 'rel="noopener noreferrer nofollow"' in public
    assert client.post(f"/admin/catalog/faq/{entry_id}", data={**form, "published": ""}).status_code == 302
    assert 'id="refunds"' not in client.get("/faq").data.decode()
    assert client.post(f"/admin/catalog/faq/{entry_id}/delete", data={"csrf_token": token}).status_code == 302
    db.session.expire_all()
    assert db.session.get(FaqEntry, entry_id) is None
    actions = set(db.session.scalars(select(AuditLog.action)))
    assert {"catalog.faq_saved", "catalog.faq_deleted"} <= actions
    assert client.post("/admin/catalog/faq/99999/delete", data={"csrf_token": token}).status_code == 404


def test_faq_admin_is_admin_only(ctx, client):
    """Support staff and users get 404 on FAQ editing."""
    make_user("support@example.com", role="support")
    login(client, "support@example.com")
    assert client.get("/admin/catalog/faq/new").status_code == 404
    token = page_token(client, "/faq")
    resp = client.post("/admin/catalog/faq/new", data={"csrf_token": token, "slug": "x", "question": "q",
                                                       "answer_md": "a"})
    assert resp.status_code == 404
