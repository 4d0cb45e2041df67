"""`ingestd keys` and `ingestd migrate --admin-key-file` against a real database."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ingestd.cli.main import cli
from shared import auth
from shared.config import Settings, get_settings
from shared.db import create_pool


@pytest.fixture
def run(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("INGESTD_DATABASE_URL", database_url)
    monkeypatch.setenv("INGESTD_DATA_DIR", str(tmp_path / "data"))

    def invoke(*arguments: str):
        # The CLI reads settings once per process; each run starts afresh.
        get_settings.cache_clear()
        result = CliRunner().invoke(cli, list(arguments), catch_exceptions=False)
        get_settings.cache_clear()
        return result

    return invoke


def verify(database_url: str, key: str) -> auth.Principal | None:
    async def check() -> auth.Principal | None:
        pool = await create_pool(database_url, Settings(database_url=database_url))
        try:
            return await auth.KeyVerifier(pool, cache_seconds=0).verify(key)
        finally:
            await pool.close()

    return asyncio.run(check())


def test_keys_create_list_revoke(run, database_url: str) -> None:
    created = run("keys", "create", "--user", "alice", "--label", "laptop")
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    principal = verify(database_url, key)
    assert principal is not None
    assert principal.user_id == "alice"
    assert not principal.is_admin

    listed = run("keys", "list")
    assert listed.exit_code == 0
    assert principal.key_id in listed.output
    assert "laptop" in listed.output
    assert key[21:] not in listed.output

    revoked = run("keys", "revoke", principal.key_id)
    assert revoked.exit_code == 0
    assert verify(database_url, key) is None
    assert principal.key_id not in run("keys", "list").output
    assert principal.key_id in run("keys", "list", "--all").output

    again = run("keys", "revoke", principal.key_id)
    assert again.exit_code == 1
    assert "no active key" in again.output


def test_keys_create_rejects_bad_user(run) -> None:
    result = run("keys", "create", "--user", "../etc")
    assert result.exit_code == 1
    assert "user id '../etc' is invalid" in result.output


def test_migrate_creates_first_key_once(run, database_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "admin-key"
    first = run("migrate", "--admin-key-file", str(key_file))
    assert first.exit_code == 0, first.output
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    principal = verify(database_url, key)
    assert principal is not None
    assert principal.is_admin

    second = run("migrate", "--admin-key-file", str(key_file))
    assert second.exit_code == 0
    assert "created none" in second.output
    assert key_file.read_text().strip() == key
