"""SearchService: embed the query through the embedder, then ask pgvector."""

from __future__ import annotations

import logging

import asyncpg
import grpc
import numpy as np

from ingestd.v1 import embedder_service_pb2, embedder_service_pb2_grpc
from ingestd.v1 import search_service_pb2 as pb
from ingestd.v1 import search_service_pb2_grpc as pb_grpc
from shared import ids
from shared.grpc_server import abort, current_principal, current_user

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
MAX_TOP_K = 100
MAX_QUERY_CHARS = 4096
EMBED_TIMEOUT_SECONDS = 30.0

# Filtering by user after an approximate HNSW scan can leave fewer than top_k
# rows. Iterative scans (pgvector 0.8 and later) keep scanning until enough
# rows pass the filter.
SEARCH_SQL = """
SELECT c.chunk_id, c.document_id, d.filename, c.chunk_ord, c.text, c.meta,
       1 - (c.embedding <=> $1) AS score
FROM document_chunks AS c
JOIN documents AS d ON d.document_id = c.document_id
WHERE c.user_id = $2 AND c.embed_model = $3 AND c.embed_version = $4
  AND (cardinality($5::uuid[]) = 0 OR c.document_id = ANY($5::uuid[]))
ORDER BY c.embedding <=> $1
LIMIT $6
"""

# Documents of the user with searchable chunks, none of them embedded with
# the model and version of the query: a search cannot find them.
OTHER_VERSION_DOCUMENTS_SQL = """
SELECT count(*) FROM (
    SELECT document_id
    FROM document_chunks
    WHERE user_id = $1
      AND (cardinality($4::uuid[]) = 0 OR document_id = ANY($4::uuid[]))
    GROUP BY document_id
    HAVING bool_and(embed_model <> $2 OR embed_version <> $3)
) AS unreachable
"""


class SearchServicer(pb_grpc.SearchServiceServicer):
    """Implements ingestd.v1.SearchService."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        embedder: embedder_service_pb2_grpc.EmbedderServiceStub,
        embedder_target: str,
    ) -> None:
        self.pool = pool
        self.embedder = embedder
        self.embedder_target = embedder_target

    async def Search(
        self, request: pb.SearchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchResponse:
        query = request.query.strip()
        if not query:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "query is empty; send the text to search for",
                reason="EMPTY_QUERY",
                field_name="query",
            )
        if len(query) > MAX_QUERY_CHARS:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"query has {len(query)} characters; the maximum is {MAX_QUERY_CHARS}",
                reason="QUERY_TOO_LONG",
                field_name="query",
            )
        top_k = request.top_k or DEFAULT_TOP_K
        if not 1 <= top_k <= MAX_TOP_K:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"top_k {request.top_k} is out of range; use 1 to {MAX_TOP_K}, or 0 for {DEFAULT_TOP_K}",
                reason="BAD_TOP_K",
                field_name="top_k",
            )
        if not -1.0 <= request.min_score <= 1.0:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"min_score {request.min_score} is out of range; use -1 to 1",
                reason="BAD_MIN_SCORE",
                field_name="min_score",
            )
        document_ids = []
        for index, value in enumerate(request.document_ids):
            try:
                document_ids.append(ids.parse_uuid(value, f"document_ids[{index}]"))
            except ValueError as exc:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    str(exc),
                    reason="INVALID_ID",
                    field_name=f"document_ids[{index}]",
                )
        if document_ids:
            await self._check_documents_exist(context, document_ids)
        # The embedder checks the caller's own key, so its rate limit and
        # revocations apply to the query embedding too.
        token = current_principal().token
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            embedded = await self.embedder.Embed(
                embedder_service_pb2.EmbedRequest(texts=[query]),
                timeout=min(
                    EMBED_TIMEOUT_SECONDS,
                    context.time_remaining() or EMBED_TIMEOUT_SECONDS,
                ),
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "query embedding failed",
                extra={"event": "search_embed_failed", "code": exc.code().name},
            )
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await abort(
                    context,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the embedder rejected the query: {exc.details()}",
                    reason="RATE_LIMITED",
                )
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                await abort(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    f"the embedder at {self.embedder_target} did not embed the query "
                    "in time; it is probably busy with other work, so retry later",
                    reason="EMBEDDER_BUSY",
                )
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"the embedder at {self.embedder_target} failed to embed the query "
                f"({exc.code().name}: {exc.details()}); check that it is running",
                reason="EMBEDDER_UNAVAILABLE",
            )
        vector = np.asarray(embedded.embeddings[0].values, dtype=np.float32)
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute("SET LOCAL hnsw.iterative_scan = 'strict_order'")
            await connection.execute(f"SET LOCAL hnsw.ef_search = {max(40, 2 * top_k)}")
            rows = await connection.fetch(
                SEARCH_SQL,
                vector,
                current_user(),
                embedded.embed_model,
                embedded.embed_version,
                document_ids,
                top_k,
            )
            # Counted only when results are short, so a full page costs
            # nothing extra.
            other_versions = 0
            if len(rows) < top_k:
                other_versions = await connection.fetchval(
                    OTHER_VERSION_DOCUMENTS_SQL,
                    current_user(),
                    embedded.embed_model,
                    embedded.embed_version,
                    document_ids,
                )
        results = []
        for row in rows:
            score = float(row["score"])
            if score < request.min_score:
                continue
            meta = row["meta"] or {}
            results.append(
                pb.SearchResult(
                    chunk_id=str(row["chunk_id"]),
                    document_id=str(row["document_id"]),
                    filename=row["filename"],
                    score=score,
                    text=row["text"],
                    chunk_ord=row["chunk_ord"],
                    page_start=int(meta.get("page_start") or 0),
                    page_end=int(meta.get("page_end") or 0),
                    heading_path=list(meta.get("heading_path") or []),
                )
            )
        return pb.SearchResponse(
            results=results,
            embed_model=embedded.embed_model,
            embed_version=embedded.embed_version,
            other_version_documents=other_versions,
        )

    async def _check_documents_exist(
        self, context: grpc.aio.ServicerContext, document_ids: list
    ) -> None:
        # Another user's document gets the same NOT_FOUND as one that does not
        # exist, so ids cannot be probed.
        async with self.pool.acquire() as connection:
            found = await connection.fetch(
                "SELECT document_id FROM documents WHERE user_id = $1 "
                "AND document_id = ANY($2::uuid[])",
                current_user(),
                document_ids,
            )
        missing = set(document_ids) - {row["document_id"] for row in found}
        if missing:
            first = sorted(str(document_id) for document_id in missing)[0]
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"document {first} not found; list your documents with ListDocuments",
                reason="DOCUMENT_NOT_FOUND",
                field_name="document_ids",
            )
