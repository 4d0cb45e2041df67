"""RetryJob resumes a failed job from the last stage that succeeded.

Each scenario makes one stage fail for real, either by a failpoint with no
retries left or by the embeddings API rejecting a request. It then removes
the cause and calls RetryJob through the gateway's gRPC API. The job must
return to the status in shared.jobs.RETRY_TARGETS and complete. Rows that
were written before the failure must be kept as they are, with the same
xmin, and no earlier stage may run again.
"""

from __future__ import annotations

import hashlib
import signal
import uuid

import asyncpg
import grpc
import pytest

from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared import ids
from shared.jobs import RETRY_TARGETS, Status
from shared.proto_convert import status_from_proto
from tests.fault.conftest import (
    Cluster,
    ServiceProcess,
    assert_invariants,
    document_text,
    events_of,
    openai_embedder,
    upload,
    wait_terminal,
)
from tests.fault.openai_server import EmbeddingsServer, Reply

pytestmark = pytest.mark.fault

DEFAULT_USER = "local"


def document_id_of(data: bytes) -> uuid.UUID:
    return ids.document_id(DEFAULT_USER, hashlib.sha256(data).hexdigest())


async def retry_job(port: int, job_id: str) -> upload_pb.RetryJobResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = upload_grpc.UploadServiceStub(channel)
        return await stub.RetryJob(upload_pb.RetryJobRequest(job_id=job_id), timeout=30)


async def stop(process: ServiceProcess) -> None:
    """Stop a replica with SIGTERM, so it drains and exits cleanly."""
    process.signal(signal.SIGTERM)
    assert await process.wait_exit() == 0, process.log_tail()


def claims_of(events: list[asyncpg.Record], stage: str) -> list[asyncpg.Record]:
    return [
        event
        for event in events
        if event["detail"].get("action") == "claim"
        and event["worker"].startswith(f"{stage}@")
    ]


def retry_job_events(events: list[asyncpg.Record]) -> list[asyncpg.Record]:
    return [event for event in events if event["detail"].get("action") == "retry_job"]


async def buffer_versions(
    connection: asyncpg.Connection, table: str
) -> dict[uuid.UUID, str]:
    """Map chunk_id to the row's xmin, which changes whenever the row is rewritten."""
    rows = await connection.fetch(
        f"SELECT chunk_id, xmin::text AS version FROM {table}"
    )
    return {row["chunk_id"]: row["version"] for row in rows}


async def test_retry_failed_parse(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    data = document_text(10, paragraphs=40)
    document_id = document_id_of(data)
    failing_gateway, _chunker, _embedder = await cluster.start_all(
        gateway={
            "failpoints": f"parse.before_store@{document_id}=raise",
            "max_retries": 0,
        },
        embedder=openai_embedder(embedding_api),
    )
    async with cluster.channel() as channel:
        response = await upload(channel, data, "parse.md")
    job_id = response.job.job_id
    assert response.job.document_id == str(document_id)

    async with pool.acquire() as connection:
        (failed,) = await wait_terminal(connection, [job_id])
        assert failed["status"] == "failed_parse", failed["last_error"]
        assert failed["last_error"]["code"] == "internal_error"
        assert failed["parsed_path"] is None

        # The cause goes away with the failpoint: a gateway without it
        # takes over parsing and serves the RetryJob call.
        await stop(failing_gateway)
        gateway = cluster.spawn("gateway")
        await gateway.wait_serving()
        retried = await retry_job(gateway.port, job_id)
        assert (
            status_from_proto(retried.job.status) == RETRY_TARGETS[Status.FAILED_PARSE]
        )
        assert status_from_proto(retried.job.status) == Status.UPLOADED

        (job,) = await wait_terminal(connection, [job_id])
        events = await events_of(connection, job_id)
        report = await assert_invariants(connection)

        # A retry of a job that did not fail is rejected.
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await retry_job(gateway.port, job_id)

    assert job["status"] == "complete", job["last_error"]
    (moved_back,) = retry_job_events(events)
    assert moved_back["from_status"] == "failed_parse"
    assert moved_back["to_status"] == "uploaded"
    parse_claims = claims_of(events, "parse")
    assert len(parse_claims) == 2
    assert parse_claims[1]["event_id"] > moved_back["event_id"]
    assert parse_claims[1]["from_status"] == "uploaded"
    assert parse_claims[1]["worker"] in gateway.worker_ids()
    # RetryJob gives the stage a fresh count of claims.
    assert parse_claims[1]["detail"]["attempt"] == 1
    assert report.complete_jobs == 1
    assert rejected.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_retry_failed_chunking(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    _gateway, failing_chunker, _embedder = await cluster.start_all(
        chunker={"failpoints": "chunk.before_store=raise", "max_retries": 0},
        embedder=openai_embedder(embedding_api),
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(11, paragraphs=40), "chunk.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (failed,) = await wait_terminal(connection, [job_id])
        assert failed["status"] == "failed_chunking", failed["last_error"]
        assert failed["last_error"]["code"] == "internal_error"
        parsed_path = failed["parsed_path"]
        assert parsed_path is not None
        parsed_file = cluster.settings.blob_dir / parsed_path
        parsed_before = parsed_file.stat()
        document_before = await connection.fetchrow(
            "SELECT parsed_sha256, xmin::text AS version FROM documents "
            "WHERE document_id = $1",
            failed["document_id"],
        )

        await stop(failing_chunker)
        chunker = cluster.spawn("chunker")
        await chunker.wait_serving()
        retried = await retry_job(cluster.gateway_port, job_id)
        assert (
            status_from_proto(retried.job.status)
            == RETRY_TARGETS[Status.FAILED_CHUNKING]
        )
        assert status_from_proto(retried.job.status) == Status.PARSE_VALIDATED

        (job,) = await wait_terminal(connection, [job_id])
        events = await events_of(connection, job_id)
        document_after = await connection.fetchrow(
            "SELECT parsed_sha256, xmin::text AS version FROM documents "
            "WHERE document_id = $1",
            failed["document_id"],
        )
        report = await assert_invariants(connection)

    assert job["status"] == "complete", job["last_error"]
    (moved_back,) = retry_job_events(events)
    assert moved_back["from_status"] == "failed_chunking"
    assert moved_back["to_status"] == "parse_validated"
    # The parsed text was reused: no second parse, the same blob and row.
    assert len(claims_of(events, "parse")) == 1
    assert job["parsed_path"] == parsed_path
    assert job["parsed_sha256"] == failed["parsed_sha256"]
    parsed_after = parsed_file.stat()
    assert parsed_after.st_ino == parsed_before.st_ino
    assert parsed_after.st_mtime_ns == parsed_before.st_mtime_ns
    assert document_after["version"] == document_before["version"]
    chunk_claims = claims_of(events, "chunk")
    assert len(chunk_claims) == 2
    assert chunk_claims[1]["event_id"] > moved_back["event_id"]
    assert chunk_claims[1]["from_status"] == "parse_validated"
    assert chunk_claims[1]["worker"] in chunker.worker_ids()
    assert chunk_claims[1]["detail"]["attempt"] == 1
    assert report.complete_jobs == 1


async def test_retry_failed_embedding(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    batch_size = 4
    # Two batches are stored, then the API rejects the third request.
    embedding_api.script(Reply(), Reply(), Reply.error(400))
    await cluster.start_all(
        embedder=openai_embedder(embedding_api, embed_batch_size=batch_size)
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(12, paragraphs=120), "embed.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (failed,) = await wait_terminal(connection, [job_id])
        assert failed["status"] == "failed_embedding", failed["last_error"]
        assert failed["last_error"]["code"] == "embedding_request_rejected"
        texts = [
            row["text"]
            for row in await connection.fetch(
                "SELECT text FROM document_chunk_buffer ORDER BY chunk_ord"
            )
        ]
        assert len(texts) > 3 * batch_size, "the document needs at least four batches"
        vectors_before = await buffer_versions(connection, "document_vector_buffer")
        chunks_before = await buffer_versions(connection, "document_chunk_buffer")
        stored_ords = await connection.fetch(
            """
            SELECT c.chunk_ord FROM document_vector_buffer AS v
            JOIN document_chunk_buffer AS c ON c.chunk_id = v.chunk_id
            ORDER BY c.chunk_ord
            """
        )
        assert [row["chunk_ord"] for row in stored_ords] == list(range(2 * batch_size))
        requests_before = len(embedding_api.embedding_requests())
        assert requests_before == 3

        # The API accepts every request from now on.
        embedding_api.script()
        retried = await retry_job(cluster.gateway_port, job_id)
        assert (
            status_from_proto(retried.job.status)
            == RETRY_TARGETS[Status.FAILED_EMBEDDING]
        )
        assert status_from_proto(retried.job.status) == Status.CHUNKS_STORED

        (job,) = await wait_terminal(connection, [job_id])
        events = await events_of(connection, job_id)
        vectors_after = await buffer_versions(connection, "document_vector_buffer")
        chunks_after = await buffer_versions(connection, "document_chunk_buffer")
        report = await assert_invariants(connection)

    assert job["status"] == "complete", job["last_error"]
    (moved_back,) = retry_job_events(events)
    assert moved_back["from_status"] == "failed_embedding"
    assert moved_back["to_status"] == "chunks_stored"
    # Vectors stored before the failure were kept, not written again.
    assert len(vectors_before) == 2 * batch_size
    for chunk_id, version in vectors_before.items():
        assert vectors_after[chunk_id] == version, chunk_id
    assert len(vectors_after) == len(texts)
    assert chunks_after == chunks_before
    # Only the chunks without a vector went to the API again.
    resent = [
        text
        for request in embedding_api.embedding_requests()[requests_before:]
        for text in request.inputs
    ]
    assert resent == texts[2 * batch_size :]
    assert len(claims_of(events, "parse")) == 1
    assert len(claims_of(events, "chunk")) == 1
    embed_claims = claims_of(events, "embed")
    assert len(embed_claims) == 2
    assert embed_claims[1]["from_status"] == "chunks_stored"
    assert embed_claims[1]["detail"]["attempt"] == 1
    assert report.complete_jobs == 1
