"""The embed stage: chunks_stored → embedding → embeddings_stored → complete."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import numpy as np
from pgvector import Vector

from services.embedder.backends import EmbeddingBackend, validate_vectors
from shared import failpoints, ids, jobs
from shared.errors import TransientError
from shared.hashing import vector_sha
from shared.jobs import EMBED_STAGE, ClaimedJob, Lease, Status
from shared.worker import BaseWorker

log = logging.getLogger(__name__)

MISSING_CHUNKS_SQL = """
SELECT c.chunk_id, c.chunk_ord, c.chunk_sha, c.text
FROM document_chunk_buffer AS c
LEFT JOIN document_vector_buffer AS v
  ON v.chunk_id = c.chunk_id AND v.embed_model = $4 AND v.embed_version = $5
WHERE c.document_id = $1 AND c.chunker_name = $2 AND c.chunker_version = $3
  AND v.chunk_id IS NULL
ORDER BY c.chunk_ord
LIMIT $6
"""

COUNT_SQL = """
SELECT count(c.chunk_id) AS chunks, count(v.chunk_id) AS vectors
FROM document_chunk_buffer AS c
LEFT JOIN document_vector_buffer AS v
  ON v.chunk_id = c.chunk_id AND v.embed_model = $4 AND v.embed_version = $5
WHERE c.document_id = $1 AND c.chunker_name = $2 AND c.chunker_version = $3
"""

# Vectors already searchable for the same chunk text, model and version,
# from any document or user; served by document_chunks_chunk_sha_idx.
STORED_VECTORS_SQL = """
SELECT DISTINCT ON (chunk_sha) chunk_sha, embedding
FROM document_chunks
WHERE chunk_sha = ANY($1::text[]) AND embed_model = $2 AND embed_version = $3
"""

# An equal vector_sha makes the rewrite a no-op (no new row version); a
# different one replaces the vector, and RETURNING reports which happened.
UPSERT_VECTORS_SQL = """
INSERT INTO document_vector_buffer AS v
    (document_id, chunk_id, embed_model, embed_version, vector, vector_sha, batch_id)
SELECT $1, chunk_id, $2, $3, vector, vector_sha, $4
FROM unnest($5::uuid[], $6::vector[], $7::text[]) AS b(chunk_id, vector, vector_sha)
ON CONFLICT (chunk_id, embed_model, embed_version) DO UPDATE
    SET vector = EXCLUDED.vector,
        vector_sha = EXCLUDED.vector_sha,
        batch_id = EXCLUDED.batch_id,
        updated_at = now()
    WHERE v.vector_sha <> EXCLUDED.vector_sha
RETURNING chunk_id, (xmax = 0) AS inserted
"""

PROMOTE_SQL = """
INSERT INTO document_chunks
    (chunk_id, embed_model, embed_version, job_id, document_id, user_id, chunk_ord,
     chunker_name, chunker_version, chunk_sha, text, meta, embedding, vector_sha)
SELECT c.chunk_id, v.embed_model, v.embed_version, $6, c.document_id, $7, c.chunk_ord,
       c.chunker_name, c.chunker_version, c.chunk_sha, c.text, c.meta, v.vector, v.vector_sha
FROM document_chunk_buffer AS c
JOIN document_vector_buffer AS v
  ON v.chunk_id = c.chunk_id AND v.embed_model = $4 AND v.embed_version = $5
WHERE c.document_id = $1 AND c.chunker_name = $2 AND c.chunker_version = $3
ON CONFLICT (chunk_id, embed_model, embed_version) DO NOTHING
"""


class EmbedWorker(BaseWorker):
    """Embeds each job's chunks in micro-batches, then makes them searchable."""

    spec = EMBED_STAGE

    def __init__(self, *, backend: EmbeddingBackend, batch_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backend = backend
        self.batch_size = batch_size
        self.embed_version = backend.embed_version

    def _key(self, job: ClaimedJob) -> tuple:
        return (
            job.document_id,
            job.chunker_name,
            job.chunker_version,
            job.embed_model,
            job.embed_version,
        )

    async def process(self, job: ClaimedJob, lease: Lease) -> None:
        if lease.status in (Status.EMBEDDING_QUEUED, Status.EMBEDDING_IN_PROGRESS):
            await self._embed_missing(job, lease)
        if lease.status == Status.EMBEDDINGS_STORED:
            await self.finalize(job, lease)

    async def _embed_missing(self, job: ClaimedJob, lease: Lease) -> None:
        # Resuming after a crash: whatever is already in the vector buffer
        # counts as done, and only chunks without a vector are embedded.
        async with self.pool.acquire() as connection:
            counts = await connection.fetchrow(COUNT_SQL, *self._key(job))
        total, done = counts["chunks"], counts["vectors"]
        if total != job.progress.get("chunks_total", total):
            raise TransientError(
                "chunk_count_mismatch",
                f"the chunk buffer holds {total} chunks but the job expects "
                f"{job.progress.get('chunks_total')}",
            )
        while True:
            async with self.pool.acquire() as connection:
                batch = await connection.fetch(
                    MISSING_CHUNKS_SQL, *self._key(job), self.batch_size
                )
            if not batch:
                break
            await failpoints.hit("embed.before_batch", document_id=job.document_id)
            vectors, reused = await self._vectors_for(job, batch)
            written = await self.store_batch(
                job, lease, batch, vectors, done_before=done
            )
            done += len(batch)
            await failpoints.hit("embed.batch_stored", document_id=job.document_id)
            log.debug(
                "stored embedding batch",
                extra={
                    "event": "embed_batch_stored",
                    "job_id": str(job.job_id),
                    "worker": self.worker_id,
                    "batch": len(batch),
                    "reused": reused,
                    "written": written,
                    "done": done,
                    "total": total,
                },
            )
        async with self.pool.acquire() as connection, connection.transaction():
            await jobs.update_progress(
                connection,
                lease,
                Status.EMBEDDINGS_STORED,
                {"embeds_total": total, "embeds_done": total},
            )

    async def _vectors_for(
        self, job: ClaimedJob, batch: list[asyncpg.Record]
    ) -> tuple[np.ndarray, int]:
        """Return one vector per chunk of batch and how many were reused.

        A chunk whose chunk_sha already has a searchable vector of the same
        model and version gets a copy of that vector, and only the others go
        through the model. chunk_sha hashes the normalized text, so texts
        that differ only in trailing whitespace or line endings share it.
        """
        async with self.pool.acquire() as connection:
            stored = {
                row["chunk_sha"]: np.asarray(
                    row["embedding"].to_numpy(), dtype=np.float32
                )
                for row in await connection.fetch(
                    STORED_VECTORS_SQL,
                    list({row["chunk_sha"] for row in batch}),
                    job.embed_model,
                    job.embed_version,
                )
            }
        missing = [
            index for index, row in enumerate(batch) if row["chunk_sha"] not in stored
        ]
        vectors = np.empty((len(batch), self.backend.dimensions), dtype=np.float32)
        if missing:
            texts = [batch[index]["text"] for index in missing]
            embedded = await asyncio.to_thread(self.backend.embed, texts)
            try:
                validate_vectors(embedded, len(texts), self.backend.dimensions)
            except ValueError as exc:
                raise TransientError("invalid_embedding", str(exc)) from exc
            vectors[missing] = embedded
        for index, row in enumerate(batch):
            vector = stored.get(row["chunk_sha"])
            if vector is not None:
                if vector.shape != (self.backend.dimensions,):
                    raise TransientError(
                        "invalid_embedding",
                        f"stored vector for chunk_sha {row['chunk_sha']} has shape "
                        f"{vector.shape}; expected ({self.backend.dimensions},)",
                    )
                vectors[index] = vector
        return vectors, len(batch) - len(missing)

    async def store_batch(
        self,
        job: ClaimedJob,
        lease: Lease,
        batch: list[asyncpg.Record],
        vectors: np.ndarray,
        *,
        done_before: int,
    ) -> int:
        """Persist one micro-batch with its progress update in one transaction.

        Returns the number of vector rows inserted or changed: 0 when the
        batch was already stored with equal vectors.
        """
        chunk_ids = [row["chunk_id"] for row in batch]
        batch_id = ids.batch_id(
            job.job_id,
            job.embed_model,
            job.embed_version,
            batch[0]["chunk_ord"],
            batch[-1]["chunk_ord"],
        )
        shas = [vector_sha(vector) for vector in vectors]
        async with self.pool.acquire() as connection, connection.transaction():
            await jobs.update_progress(
                connection,
                lease,
                Status.EMBEDDING_IN_PROGRESS,
                {"embeds_done": done_before + len(batch)},
            )
            rows = await connection.fetch(
                UPSERT_VECTORS_SQL,
                job.document_id,
                job.embed_model,
                job.embed_version,
                batch_id,
                chunk_ids,
                # Sent in pgvector's binary format: exact float32 values, and
                # no text to format here or to parse on the server.
                [Vector(vector) for vector in vectors],
                shas,
            )
        replaced = [row["chunk_id"] for row in rows if not row["inserted"]]
        if replaced:
            log.warning(
                "replaced stored vectors that differed",
                extra={
                    "event": "vectors_replaced",
                    "job_id": str(job.job_id),
                    "worker": self.worker_id,
                    "chunk_ids": [str(chunk_id) for chunk_id in replaced[:20]],
                    "count": len(replaced),
                },
            )
        return len(rows)

    async def finalize(self, job: ClaimedJob, lease: Lease) -> None:
        """Promote the buffers to document_chunks and mark the job complete, atomically."""
        await failpoints.hit("embed.before_finalize", document_id=job.document_id)
        async with self.pool.acquire() as connection, connection.transaction():
            # The errors of earlier attempts stay in job_events; a complete
            # job shows none.
            await jobs.advance(
                connection,
                lease,
                Status.COMPLETE,
                keep_lease=False,
                set_columns={"last_error": None},
            )
            result = await connection.execute(
                PROMOTE_SQL, *self._key(job), job.job_id, job.user_id
            )
            promoted = int(result.split()[-1])
            searchable = await connection.fetchval(
                "SELECT count(*) FROM document_chunks WHERE job_id = $1", job.job_id
            )
            expected = job.progress.get("chunks_total", searchable)
            if searchable != expected:
                # Raising rolls back the move to complete with the promotion.
                raise TransientError(
                    "promotion_incomplete",
                    f"{searchable} of {expected} chunks have a vector to promote; "
                    "the buffers changed under the job",
                )
        log.info(
            "job complete",
            extra={
                "event": "job_complete",
                "job_id": str(job.job_id),
                "document_id": str(job.document_id),
                "worker": self.worker_id,
                "stage": self.spec.name,
                "promoted": promoted,
            },
        )
