"""The alembic migrations on an empty database."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

import migrations
from tests.conftest import _with_database

CLAIM_STAGES = ("parse", "chunk", "embed")
TABLES = {
    "documents",
    "upload_jobs",
    "document_chunk_buffer",
    "document_vector_buffer",
    "document_chunks",
    "job_events",
}


def _tables(url: str) -> set[str]:
    async def fetch() -> set[str]:
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        finally:
            await connection.close()
        return {row["tablename"] for row in rows}

    return asyncio.run(fetch())


def _claim_indexes(url: str) -> set[str]:
    async def fetch() -> set[str]:
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch(
                "SELECT indexname FROM pg_indexes "
                "WHERE tablename = 'upload_jobs' AND indexname LIKE '%claim_idx'"
            )
        finally:
            await connection.close()
        return {row["indexname"] for row in rows}

    return asyncio.run(fetch())


def _create_database(postgres_url: str) -> str:
    name = f"migrate_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        connection = await asyncpg.connect(postgres_url)
        await connection.execute(f"CREATE DATABASE {name}")
        await connection.close()

    asyncio.run(create())
    return _with_database(postgres_url, name)


def test_migrations_up_down_up(postgres_url: str) -> None:
    url = _create_database(postgres_url)
    migrations.upgrade(url)
    assert _tables(url) >= TABLES
    migrations.downgrade(url, "base")
    assert not TABLES & _tables(url)
    migrations.upgrade(url)
    assert _tables(url) >= TABLES


def test_claim_indexes_down_and_up(postgres_url: str) -> None:
    url = _create_database(postgres_url)
    stage_indexes = {f"upload_jobs_{stage}_claim_idx" for stage in CLAIM_STAGES}
    migrations.upgrade(url)
    assert _claim_indexes(url) == stage_indexes
    migrations.downgrade(url, "0001")
    assert _claim_indexes(url) == {"upload_jobs_claim_idx"}
    migrations.upgrade(url)
    assert _claim_indexes(url) == stage_indexes


async def test_status_check_rejects_unknown(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        constraint = await connection.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conname = 'upload_jobs_status_check'"
        )
        indexes = await connection.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN "
            "('upload_jobs', 'document_chunks')"
        )
    finally:
        await connection.close()
    for status in ("uploaded", "embedding_in_progress", "failed_embedding"):
        assert status in constraint
    definitions = {row["indexname"]: row["indexdef"] for row in indexes}
    for stage in CLAIM_STAGES:
        assert "WHERE" in definitions[f"upload_jobs_{stage}_claim_idx"]
    assert "upload_jobs_claim_idx" not in definitions
    assert "hnsw" in definitions["document_chunks_embedding_hnsw_idx"]
