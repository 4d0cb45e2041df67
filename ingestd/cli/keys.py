"""API key administration and the key file the CLI uses on a laptop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from shared import auth
from shared.config import Settings
from shared.db import connect

KEY_FILE_NAME = "api-key"


def key_file(settings: Settings) -> Path:
    """Path of the key file that `ingestd up` writes and the CLI reads."""
    return settings.data_dir / KEY_FILE_NAME


def read_key_file(settings: Settings) -> str | None:
    """Return the key saved in the data folder, or None."""
    return read_key(key_file(settings))


def read_key(path: Path) -> str | None:
    """Return the key saved at path, or None."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_key_file(path: Path, key: str) -> Path:
    """Save key at path, readable only by the current user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)
    return path


async def _run(database_url: str, action):
    connection = await connect(database_url)
    try:
        return await action(connection)
    finally:
        await connection.close()


def create(
    database_url: str, user_id: str, *, is_admin: bool, label: str
) -> tuple[str, str]:
    """Create a key; return (key id, full key)."""
    return asyncio.run(
        _run(
            database_url,
            lambda connection: auth.create_key(
                connection, user_id, is_admin=is_admin, label=label
            ),
        )
    )


def revoke(database_url: str, key_id: str) -> bool:
    """Revoke a key; return False when no active key has that id."""
    return asyncio.run(
        _run(database_url, lambda connection: auth.revoke_key(connection, key_id))
    )


def list_all(database_url: str, include_revoked: bool) -> list[auth.ApiKeyRecord]:
    """Return every key without its secret."""
    return asyncio.run(
        _run(
            database_url,
            lambda connection: auth.list_keys(
                connection, include_revoked=include_revoked
            ),
        )
    )


def ensure_first_key(
    settings: Settings, database_url: str, path: Path
) -> tuple[str | None, bool]:
    """Create the first API key if the database has none; return (key, created).

    The new key is an admin key for the default user, saved at path. When
    active keys exist already, return the key saved at path, which may be
    None when keys were created some other way.
    """

    async def check(connection) -> tuple[str | None, bool]:
        if await auth.count_active_keys(connection) > 0:
            return read_key(path), False
        _key_id, key = await auth.create_key(
            connection,
            settings.default_user,
            is_admin=True,
            label="first key, created with the database",
        )
        return key, True

    key, created = asyncio.run(_run(database_url, check))
    if created and key is not None:
        write_key_file(path, key)
    return key, created


def key_is_active(database_url: str, key: str) -> bool:
    """Return True when key matches an active key in the database."""
    parts = auth.split_key(key)
    if parts is None:
        return False
    key_id, secret = parts

    async def check(connection) -> bool:
        stored = await connection.fetchval(
            "SELECT secret_sha256 FROM api_keys WHERE key_id = $1 AND revoked_at IS NULL",
            key_id,
        )
        return stored is not None and stored == auth.hash_secret(secret)

    return asyncio.run(_run(database_url, check))
