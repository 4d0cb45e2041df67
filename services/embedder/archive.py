"""Archive and delete the buffer rows of jobs completed long enough ago.

After a job is complete its buffers are only needed to resume or audit it.
Once the retention has passed, the rows are written as gzip-compressed JSON
lines to ``archive/{user_id}/{document_id}/{job_id}.jsonl.gz`` and deleted.
Both steps are idempotent: the archive is rewritten identically and the
deletes find nothing the second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
from typing import Any

import asyncpg

from shared.errors import DATABASE_ERRORS
from shared.storage import BlobStore, archive_key

log = logging.getLogger(__name__)

DUE_JOBS_SQL = """
SELECT job_id, user_id, document_id, chunker_name, chunker_version, embed_model, embed_version
FROM upload_jobs
WHERE status = 'complete' AND buffers_archived_at IS NULL
  AND updated_at < now() - make_interval(secs => $1)
ORDER BY updated_at
LIMIT $2
-- Replicas archive different jobs instead of waiting on each other.
FOR UPDATE SKIP LOCKED
"""

BUFFER_ROWS_SQL = """
SELECT c.chunk_id, c.chunk_ord, c.chunk_sha, c.text, c.meta,
       v.vector::text AS vector, v.vector_sha, v.batch_id
FROM document_chunk_buffer AS c
LEFT JOIN document_vector_buffer AS v
  ON v.chunk_id = c.chunk_id AND v.embed_model = $4 AND v.embed_version = $5
WHERE c.document_id = $1 AND c.chunker_name = $2 AND c.chunker_version = $3
ORDER BY c.chunk_ord
"""


def _archive_bytes(job: asyncpg.Record, rows: list[asyncpg.Record]) -> bytes:
    lines = []
    for row in rows:
        record: dict[str, Any] = {
            "job_id": str(job["job_id"]),
            "chunk_id": str(row["chunk_id"]),
            "chunk_ord": row["chunk_ord"],
            "chunk_sha": row["chunk_sha"],
            "text": row["text"],
            "meta": row["meta"],
            "embed_model": job["embed_model"],
            "embed_version": job["embed_version"],
            "vector": json.loads(row["vector"]) if row["vector"] else None,
            "vector_sha": row["vector_sha"],
            "batch_id": str(row["batch_id"]) if row["batch_id"] else None,
        }
        lines.append(json.dumps(record, ensure_ascii=False, sort_keys=True))
    # mtime=0 keeps the archive byte-identical across reruns.
    return gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), mtime=0)


async def archive_due_buffers(
    pool: asyncpg.Pool, storage: BlobStore, *, retention_seconds: float, limit: int = 20
) -> int:
    """Archive and delete buffers of up to limit due jobs; return how many jobs."""
    archived = 0
    async with pool.acquire() as connection, connection.transaction():
        due = await connection.fetch(DUE_JOBS_SQL, float(retention_seconds), limit)
        for job in due:
            key_args = (
                job["document_id"],
                job["chunker_name"],
                job["chunker_version"],
                job["embed_model"],
                job["embed_version"],
            )
            rows = await connection.fetch(BUFFER_ROWS_SQL, *key_args)
            key = archive_key(job["user_id"], job["document_id"], job["job_id"])
            # With no rows left, an archive written by an earlier round whose
            # commit was lost stays as it is rather than being emptied.
            if rows or not await asyncio.to_thread(storage.exists, key):
                await asyncio.to_thread(storage.put, key, _archive_bytes(job, rows))
            # Only this job's vectors: the chunk join limits them to its
            # chunker version, since another job of the same document and
            # model may use another chunker version.
            await connection.execute(
                """
                DELETE FROM document_vector_buffer AS v
                USING document_chunk_buffer AS c
                WHERE v.chunk_id = c.chunk_id
                  AND c.document_id = $1 AND c.chunker_name = $2 AND c.chunker_version = $3
                  AND v.embed_model = $4 AND v.embed_version = $5
                """,
                *key_args,
            )
            # Chunk rows may still serve another job of the same document and
            # chunker, for a second embedding model. They are deleted only when
            # no such job still needs them.
            await connection.execute(
                """
                DELETE FROM document_chunk_buffer AS c
                WHERE c.document_id = $1 AND c.chunker_name = $2 AND c.chunker_version = $3
                  AND NOT EXISTS (
                      SELECT 1 FROM upload_jobs AS j
                      WHERE j.document_id = c.document_id AND j.job_id <> $4
                        AND j.chunker_name = c.chunker_name
                        AND j.chunker_version = c.chunker_version
                        AND j.buffers_archived_at IS NULL)
                  AND NOT EXISTS (
                      SELECT 1 FROM document_vector_buffer AS v WHERE v.chunk_id = c.chunk_id)
                """,
                *key_args[:3],
                job["job_id"],
            )
            await connection.execute(
                "UPDATE upload_jobs SET buffers_archived_at = now() WHERE job_id = $1",
                job["job_id"],
            )
            archived += 1
            log.info(
                "archived buffer rows",
                extra={
                    "event": "buffers_archived",
                    "job_id": str(job["job_id"]),
                    "document_id": str(job["document_id"]),
                    "rows": len(rows),
                    "key": key,
                },
            )
    return archived


async def run_archiver(
    pool: asyncpg.Pool,
    storage: BlobStore,
    *,
    retention_seconds: float,
    interval_seconds: float,
) -> None:
    """Archive due buffers every interval_seconds until cancelled."""
    while True:
        try:
            while await archive_due_buffers(
                pool, storage, retention_seconds=retention_seconds
            ):
                pass
        except DATABASE_ERRORS as exc:
            log.warning(
                "buffer archiving failed; trying again next round",
                extra={"event": "archive_failed", "error": str(exc)},
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.sleep(interval_seconds)
