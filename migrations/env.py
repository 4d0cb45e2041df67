"""Alembic environment: runs migrations over asyncpg, one migrator at a time."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

# Arbitrary constant: replicas that start together (a compose migrate job and
# a developer's `ingestd migrate`) queue on this advisory lock instead of
# racing to create the same tables.
MIGRATION_LOCK_KEY = 7_342_001


def _sqlalchemy_url() -> str:
    url = context.config.attributes.get("database_url") or os.environ.get(
        "INGESTD_DATABASE_URL"
    )
    if not url:
        raise RuntimeError(
            "no database URL: run `ingestd migrate`, which starts the embedded "
            "PostgreSQL, or set INGESTD_DATABASE_URL"
        )
    scheme, _, rest = url.partition("://")
    return f"postgresql+asyncpg://{rest}" if scheme.startswith("postgres") else url


def _run(connection: Connection) -> None:
    connection.execute(
        text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
    )
    try:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.execute(
            text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY}
        )
        connection.commit()


async def _run_online() -> None:
    engine = create_async_engine(_sqlalchemy_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_sqlalchemy_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
