"""The append-only audit log: staff actions and auth events."""
from __future__ import annotations

import json

from sqlalchemy import insert

from console.extensions import db
from console.models import AuditLog, utcnow


def record(action: str, *, actor_id: int | None, target_type: str | None = None,
           target_id: object = None, before: dict | None = None, after: dict | None = None,
           ip: str | None = None, user_agent: str | None = None) -> None:
    """Append one row; runs inside the caller's transaction so it commits with the change."""
    db.session.execute(
        insert(AuditLog).values(
            actor_id=actor_id, action=action, target_type=target_type,
            target_id=None if target_id is None else str(target_id),
            before=json.dumps(before, sort_keys=True) if before is not None else None,
            after=json.dumps(after, sort_keys=True) if after is not None else None,
            ip=ip, user_agent=(user_agent or "")[:300] or None, created_at=utcnow(),
        )
    )
