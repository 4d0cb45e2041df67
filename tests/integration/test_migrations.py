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


def _names(url: str, query: str) -> set[str]:
    """Return the first column of every row the query returns."""

    async def fetch() -> set[str]:
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch(query)
        finally:
            await connection.close()
        return {row[0] for row in rows}

    return asyncio.run(fetch())


def _tables(url: str) -> set[str]:
    return _names(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")


def _claim_indexes(url: str) -> set[str]:
    return _names(
        url,
        "SELECT indexname FROM pg_indexes "
        "WHERE tablename = 'upload_jobs' AND indexname LIKE '%claim_idx'",
    )


def _job_events_foreign_keys(url: str) -> set[str]:
    return _names(
        url,
        "SELECT conname FROM pg_constraint "
        "WHERE conrelid = 'job_events'::regclass AND contype = 'f'",
    )


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


JOB_WITH_EVENTS_SQL = """
WITH document AS (
    INSERT INTO documents (document_id, user_id, content_type, byte_size, raw_sha256, raw_path)
    VALUES (gen_random_uuid(), 'events', 'text/plain', 1, md5(random()::text), 'raw/events')
    RETURNING document_id, raw_path
),
job AS (
    INSERT INTO upload_jobs
        (job_id, user_id, document_id, status, raw_path, chunker_name, chunker_version,
         embed_model, embed_version)
    SELECT gen_random_uuid(), 'events', document_id, 'uploaded', raw_path,
           'c', 'c-1', 'm', 'm-1'
    FROM document
    RETURNING job_id, document_id
),
events AS (
    INSERT INTO job_events (job_id, from_status, to_status)
    SELECT job_id, from_status, 'uploaded'
    FROM job, (VALUES (NULL), ('uploaded')) AS e(from_status)
)
SELECT job_id, document_id FROM job
"""


async def _events_of(connection: asyncpg.Connection, job_id: uuid.UUID) -> int:
    return await connection.fetchval(
        "SELECT count(*) FROM job_events WHERE job_id = $1", job_id
    )


async def test_deleted_job_takes_events(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        untouched = await connection.fetchrow(JOB_WITH_EVENTS_SQL)
        direct = await connection.fetchrow(JOB_WITH_EVENTS_SQL)
        cascaded = await connection.fetchrow(JOB_WITH_EVENTS_SQL)
        assert await _events_of(connection, direct["job_id"]) == 2

        await connection.execute(
            "DELETE FROM upload_jobs WHERE job_id = $1", direct["job_id"]
        )
        await connection.execute(
            "DELETE FROM documents WHERE document_id = $1", cascaded["document_id"]
        )

        assert await _events_of(connection, direct["job_id"]) == 0
        assert await _events_of(connection, cascaded["job_id"]) == 0
        assert await _events_of(connection, untouched["job_id"]) == 2
    finally:
        await connection.close()


def test_job_events_key_down_and_up(postgres_url: str) -> None:
    url = _create_database(postgres_url)

    migrations.upgrade(url)
    assert _job_events_foreign_keys(url) == set()
    migrations.downgrade(url, "0004")
    assert _job_events_foreign_keys(url) == {"job_events_job_id_fkey"}
    migrations.upgrade(url)
    assert _job_events_foreign_keys(url) == set()
