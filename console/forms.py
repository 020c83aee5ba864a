"""Shared form bits. Feature forms live next to their views."""
from __future__ import annotations

import unicodedata

from wtforms.validators import ValidationError


def printable(form, field) -> None:
    """Reject control, format (bidi overrides) and private-use characters in names and labels."""
    for ch in field.data or "":
        if unicodedata.category(ch) in {"Cc", "Cf", "Co", "Cs"}:
            raise ValidationError("Use printable characters only.")
