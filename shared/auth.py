"""API keys: creation, storage as a hash, verification with a short cache.

A key reads ``ingestd_<key id>_<secret>``. The key id is 12 hex digits and
is public: listings and logs show it. The secret is 32 random bytes in
URL-safe base64. Only the secret's SHA-256 is stored. A slow password hash
is not needed, because a 256-bit random secret cannot be guessed from its
hash the way a human-chosen password can.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from shared.ids import check_user_id

KEY_PREFIX = "ingestd"
_KEY_RE = re.compile(r"^ingestd_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class Principal:
    """Who a call acts for, as established by its API key."""

    user_id: str
    is_admin: bool
    # None when authentication is off and the call carried no key.
    key_id: str | None = None
    # The bearer token as the caller sent it, for calls to other services.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ApiKeyRecord:
    """One row of api_keys, without the secret's hash."""

    key_id: str
    user_id: str
    is_admin: bool
    label: str
    created_at: datetime
    revoked_at: datetime | None


def hash_secret(secret: str) -> str:
    """Return the hex SHA-256 of a key's secret part."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(token: str) -> tuple[str, str] | None:
    """Return (key id, secret) of a well-formed key, else None."""
    match = _KEY_RE.fullmatch(token.strip())
    if match is None:
        return None
    return match.group(1), match.group(2)


def new_key() -> tuple[str, str]:
    """Return a fresh (key id, full key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


async def create_key(
    connection: asyncpg.Connection,
    user_id: str,
    *,
    is_admin: bool = False,
    label: str = "",
) -> tuple[str, str]:
    """Store a new key for user_id; return (key id, full key).

    The full key is returned only here. Afterwards only its hash exists.
    """
    check_user_id(user_id)
    key_id, key = new_key()
    parts = split_key(key)
    assert parts is not None
    secret = parts[1]
    await connection.execute(
        """
        INSERT INTO api_keys (key_id, user_id, is_admin, secret_sha256, label)
        VALUES ($1, $2, $3, $4, $5)
        """,
        key_id,
        user_id,
        is_admin,
        hash_secret(secret),
        label,
    )
    return key_id, key


async def revoke_key(connection: asyncpg.Connection, key_id: str) -> bool:
    """Revoke a key; return False if no active key has this id."""
    result = await connection.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
        key_id,
    )
    return result.endswith(" 1")


async def list_keys(
    connection: asyncpg.Connection, *, include_revoked: bool = False
) -> list[ApiKeyRecord]:
    """Return keys without their secrets, oldest first."""
    rows = await connection.fetch(
        """
        SELECT key_id, user_id, is_admin, label, created_at, revoked_at
        FROM api_keys
        WHERE $1 OR revoked_at IS NULL
        ORDER BY created_at, key_id
        """,
        include_revoked,
    )
    return [ApiKeyRecord(**dict(row)) for row in rows]


async def count_active_keys(connection: asyncpg.Connection) -> int:
    """Return how many keys are not revoked."""
    return await connection.fetchval(
        "SELECT count(*) FROM api_keys WHERE revoked_at IS NULL"
    )


class KeyVerifier:
    """Checks bearer tokens against api_keys, caching rows for a few seconds.

    The cache keeps a database round trip off most calls. A revoked key
    stops working within cache_seconds.
    """

    def __init__(self, pool: asyncpg.Pool, *, cache_seconds: float = 10.0) -> None:
        self._pool = pool
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, asyncpg.Record | None]] = {}

    async def verify(self, token: str) -> Principal | None:
        """Return the key's principal, or None for a malformed, unknown or revoked key."""
        parts = split_key(token)
        if parts is None:
            return None
        key_id, secret = parts
        row = await self._row(key_id)
        if row is None or row["revoked_at"] is not None:
            return None
        if not hmac.compare_digest(row["secret_sha256"], hash_secret(secret)):
            return None
        return Principal(row["user_id"], row["is_admin"], key_id, token)

    async def _row(self, key_id: str) -> asyncpg.Record | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(
                """
                SELECT user_id, is_admin, secret_sha256, revoked_at
                FROM api_keys WHERE key_id = $1
                """,
                key_id,
            )
        if len(self._cache) > 10_000:
            # Ids from guessed keys must not grow the cache without bound.
            self._cache.clear()
        self._cache[key_id] = (now, row)
        return row
