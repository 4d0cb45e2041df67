"""The chunk stage: parse_validated → chunking → chunks_stored."""

from __future__ import annotations

import asyncio
import logging

from services.chunker.chunking import Chunk, MarkdownChunker
from shared import failpoints, ids, jobs
from shared.errors import PermanentError
from shared.hashing import parsed_sha256
from shared.jobs import CHUNK_STAGE, ClaimedJob, Lease, Status
from shared.storage import BlobStore
from shared.worker import BaseWorker

log = logging.getLogger(__name__)

INSERT_CHUNKS_SQL = """
INSERT INTO document_chunk_buffer
    (chunk_id, document_id, chunk_ord, chunker_name, chunker_version, chunk_sha, text, meta)
SELECT chunk_id, $2, chunk_ord, $3, $4, chunk_sha, text, meta
FROM unnest($1::uuid[], $5::int[], $6::text[], $7::text[], $8::jsonb[])
    AS c(chunk_id, chunk_ord, chunk_sha, text, meta)
ON CONFLICT DO NOTHING
"""


class ChunkWorker(BaseWorker):
    """Cuts each parsed document into chunks and stores them in the buffer."""

    spec = CHUNK_STAGE

    def __init__(
        self, *, chunker: MarkdownChunker, storage: BlobStore, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.chunker = chunker
        self.storage = storage
        self.chunker_version = chunker.version

    async def process(self, job: ClaimedJob, lease: Lease) -> None:
        await failpoints.hit("chunk.start", document_id=job.document_id)
        text = await self._load_parsed_text(job)
        async with self.pool.acquire() as connection:
            page_offsets = await connection.fetchval(
                "SELECT page_offsets FROM documents WHERE document_id = $1",
                job.document_id,
            )
        chunks = await asyncio.to_thread(self.chunker.chunk, text, page_offsets)
        limit = self.settings.max_chunks_per_document
        if len(chunks) > limit:
            raise PermanentError(
                "limit_exceeded",
                f"the document yields {len(chunks)} chunks, more than the maximum of "
                f"{limit} (INGESTD_MAX_CHUNKS_PER_DOCUMENT); split the document or "
                "raise the limit",
            )
        await failpoints.hit("chunk.before_store", document_id=job.document_id)
        await self.store_chunks(job, lease, chunks)

    async def _load_parsed_text(self, job: ClaimedJob) -> str:
        if not job.parsed_path:
            raise PermanentError(
                "parsed_text_missing",
                "the job has no parsed text; retry the job to parse it again",
            )
        try:
            data = await asyncio.to_thread(self.storage.get, job.parsed_path)
        except FileNotFoundError:
            raise PermanentError(
                "parsed_text_missing",
                f"parsed text {job.parsed_path} is missing from storage; retry the parse",
            ) from None
        text = data.decode("utf-8")
        if job.parsed_sha256 and parsed_sha256(text) != job.parsed_sha256:
            raise PermanentError(
                "parsed_text_mismatch",
                f"parsed text {job.parsed_path} does not match its recorded sha256; "
                "the blob store was changed outside ingestd",
            )
        return text

    async def store_chunks(
        self, job: ClaimedJob, lease: Lease, chunks: list[Chunk]
    ) -> None:
        """Write every chunk and move the job to chunks_stored, in one transaction.

        Chunk ids are deterministic and the insert ignores conflicts, so a
        second run over the same job leaves the first run's rows untouched.
        """
        chunk_ids = [
            ids.chunk_id(
                job.document_id, job.chunker_name, job.chunker_version, chunk.ord
            )
            for chunk in chunks
        ]
        progress = {
            "chunks_total": len(chunks),
            "chunks_done": len(chunks),
            "embeds_total": len(chunks),
            "embeds_done": 0,
        }
        async with self.pool.acquire() as connection, connection.transaction():
            await jobs.advance(
                connection,
                lease,
                Status.CHUNKS_STORED,
                keep_lease=False,
                set_columns={"progress": progress},
                detail={"chunks": len(chunks)},
            )
            if chunks:
                await connection.execute(
                    INSERT_CHUNKS_SQL,
                    chunk_ids,
                    job.document_id,
                    job.chunker_name,
                    job.chunker_version,
                    [chunk.ord for chunk in chunks],
                    [chunk.sha for chunk in chunks],
                    [chunk.text for chunk in chunks],
                    [chunk.meta() for chunk in chunks],
                )
        log.info(
            "stored chunks",
            extra={
                "event": "chunks_stored",
                "job_id": str(job.job_id),
                "document_id": str(job.document_id),
                "worker": self.worker_id,
                "stage": self.spec.name,
                "chunks": len(chunks),
            },
        )
