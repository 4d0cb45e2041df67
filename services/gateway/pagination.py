"""Opaque page tokens for keyset pagination over (created_at DESC, id DESC)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def encode_token(created_at: datetime, row_id: uuid.UUID) -> str:
    """Build the token that resumes after the row (created_at, row_id)."""
    raw = json.dumps({"c": created_at.isoformat(), "i": str(row_id)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, uuid.UUID] | None:
    """Return the position a token resumes after; None for an empty token.

    Raises ValueError for a token that this server did not issue.
    """
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        created_at = datetime.fromisoformat(data["c"])
        # Tokens this server issues carry a timezone and a recent year; a
        # forged extreme date would overflow in PostgreSQL instead.
        if created_at.tzinfo is None or not 1970 <= created_at.year <= 9000:
            raise ValueError("page token time out of range")
        return created_at, uuid.UUID(data["i"])
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        raise ValueError(
            f"page_token {token[:40]!r} is invalid; pass the next_page_token of the "
            "previous response unchanged, or an empty token for the first page"
        ) from None


def page_size(requested: int) -> int:
    """Return the effective page size; raises ValueError when out of range."""
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= requested <= MAX_PAGE_SIZE:
        raise ValueError(
            f"page_size {requested} is out of range; use 1 to {MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}"
        )
    return requested
