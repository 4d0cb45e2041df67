"""The embed stage against an OpenAI-compatible embeddings API that misbehaves.

The embedder runs as its own process with the HTTP backend pointed at a
local scripted server. Rate limits and server errors are retried after the
job-level backoff, never sooner than the server's Retry-After. A rejected
request fails the job at once. A response with missing, short or
non-finite vectors is an error, and nothing of that batch is stored.
"""

from __future__ import annotations

import math
import uuid
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from services.embedder.openai_api import MAX_RETRY_AFTER_SECONDS
from tests.fault.conftest import (
    Cluster,
    assert_invariants,
    document_text,
    events_of,
    openai_embedder,
    upload,
    wait_for,
    wait_terminal,
)
from tests.fault.openai_server import DIMENSIONS, EmbeddingsServer, Reply

pytestmark = pytest.mark.fault

BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 4.0
# shared.errors.backoff_seconds adds up to this fraction of the delay.
BACKOFF_JITTER = 0.1
RETRY_AFTER_SECONDS = 2
# Generous bound on how long a due retry may wait for a claim on a loaded
# machine: the poll interval is 1 s.
CLAIM_SLACK_SECONDS = 15.0


def embedder_settings(server: EmbeddingsServer, **settings: Any) -> dict[str, Any]:
    return openai_embedder(
        server,
        backoff_base_seconds=BACKOFF_BASE_SECONDS,
        backoff_max_seconds=BACKOFF_MAX_SECONDS,
        **settings,
    )


def policy_delay_range(retry_count: int) -> tuple[float, float]:
    """Smallest and largest backoff before retry number retry_count + 1."""
    delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2**retry_count)
    return delay, min(BACKOFF_MAX_SECONDS, delay * (1 + BACKOFF_JITTER))


async def retry_events(connection: asyncpg.Connection, job_id: str) -> list:
    return [
        event
        for event in await events_of(connection, job_id)
        if event["detail"].get("action") == "retry"
    ]


async def embed_claims(connection: asyncpg.Connection, job_id: str) -> list:
    return [
        event
        for event in await events_of(connection, job_id)
        if event["detail"].get("action") == "claim"
        and event["worker"].startswith("embed@")
    ]


async def buffered_vector_ords(connection: asyncpg.Connection) -> list[int]:
    rows = await connection.fetch(
        """
        SELECT c.chunk_ord FROM document_vector_buffer AS v
        JOIN document_chunk_buffer AS c ON c.chunk_id = v.chunk_id
        ORDER BY c.chunk_ord
        """
    )
    return [row["chunk_ord"] for row in rows]


async def chunk_texts(connection: asyncpg.Connection) -> list[str]:
    rows = await connection.fetch(
        "SELECT text FROM document_chunk_buffer ORDER BY chunk_ord"
    )
    return [row["text"] for row in rows]


async def test_transient_errors_then_success(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    embedding_api.script(
        Reply.error(429, retry_after=str(RETRY_AFTER_SECONDS)),
        # A Retry-After shorter than the backoff leaves the backoff in force.
        Reply.error(503, retry_after="0"),
        Reply.error(502),
    )
    _gateway, _chunker, embedder = await cluster.start_all(
        embedder=embedder_settings(embedding_api)
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(1), "one.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (job,) = await wait_terminal(connection, [job_id])
        retries = await retry_events(connection, job_id)
        claims = await embed_claims(connection, job_id)
        report = await assert_invariants(connection)

    assert job["status"] == "complete", job["last_error"]
    requests = embedding_api.embedding_requests()
    assert [request.status for request in requests] == [429, 503, 502, 200]
    # Three retries is the default INGESTD_MAX_RETRIES, so the job used all.
    assert [claim["detail"]["attempt"] for claim in claims] == [1, 2, 3, 4]
    assert [event["detail"]["code"] for event in retries] == [
        "embedding_rate_limited",
        "embedding_api_error",
        "embedding_api_error",
    ]
    # A complete job shows no error; job_events keeps the history.
    assert job["last_error"] is None

    # The 429's Retry-After is longer than the first backoff, so it wins.
    delays = [event["detail"]["delay_seconds"] for event in retries]
    assert delays[0] == RETRY_AFTER_SECONDS
    for retry_count in (1, 2):
        low, high = policy_delay_range(retry_count)
        assert delays[retry_count] >= low, (retry_count, delays)
        assert delays[retry_count] <= high, (retry_count, delays)

    # Each retry reached the server no sooner than its delay allowed.
    for index, event in enumerate(retries):
        run_after = event["created_at"] + timedelta(seconds=delays[index])
        gap = requests[index + 1].arrived_monotonic - requests[index].arrived_monotonic
        assert requests[index + 1].arrived_at >= run_after, index
        assert gap >= delays[index], (index, gap)
        assert gap <= delays[index] + CLAIM_SLACK_SECONDS, (index, gap)
    assert (
        requests[1].arrived_monotonic - requests[0].arrived_monotonic
        >= RETRY_AFTER_SECONDS
    )
    last_run_after = retries[-1]["created_at"] + timedelta(seconds=delays[-1])
    assert abs(job["run_after"] - last_run_after) < timedelta(milliseconds=1)

    logged = embedder.events("job_retry")
    assert [record["retry"] for record in logged] == [1, 2, 3]
    assert [record["delay_seconds"] for record in logged] == [
        round(delay, 3) for delay in delays
    ]
    assert report.complete_jobs == 1


async def test_retries_exhausted_fails_job(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    embedding_api.script(then=Reply.error(503))
    await cluster.start_all(embedder=embedder_settings(embedding_api))
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(2), "two.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (job,) = await wait_terminal(connection, [job_id])
        retries = await retry_events(connection, job_id)
        await assert_invariants(connection)

    assert job["status"] == "failed_embedding"
    assert job["last_error"]["code"] == "embedding_api_error"
    assert "gave up after 3 retries" in job["last_error"]["message"]
    assert len(retries) == 3
    assert len(embedding_api.embedding_requests()) == 4
    for retry_count, event in enumerate(retries):
        low, high = policy_delay_range(retry_count)
        assert event["detail"]["delay_seconds"] >= low, retry_count
        assert event["detail"]["delay_seconds"] <= high, retry_count


async def test_huge_retry_after_is_capped(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    # Valid delay-seconds, but far past PostgreSQL's interval range.
    embedding_api.script(Reply.error(429, retry_after="99999999999999999999"))
    _gateway, _chunker, embedder = await cluster.start_all(
        embedder=embedder_settings(embedding_api)
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(7), "seven.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (job,) = await wait_for(
            connection,
            [job_id],
            lambda row: row["retry_count"] > 0 or row["status"] == "complete",
            description="a scheduled retry",
        )
        retries = await retry_events(connection, job_id)
        await assert_invariants(connection)

    assert job["status"] == "chunks_stored"
    assert job["lease_token"] is None
    (retry,) = retries
    assert retry["detail"]["code"] == "embedding_rate_limited"
    assert retry["detail"]["delay_seconds"] == MAX_RETRY_AFTER_SECONDS
    expected_run_after = retry["created_at"] + timedelta(
        seconds=MAX_RETRY_AFTER_SECONDS
    )
    assert abs(job["run_after"] - expected_run_after) < timedelta(milliseconds=1)
    assert embedder.events("retry_write_failed") == []
    assert len(embedding_api.embedding_requests()) == 1


async def test_bad_request_fails_at_once(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    embedding_api.script(Reply.error(400, message="'$.input' is invalid."))
    await cluster.start_all(embedder=embedder_settings(embedding_api))
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(3), "three.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (job,) = await wait_terminal(connection, [job_id])
        retries = await retry_events(connection, job_id)
        claims = await embed_claims(connection, job_id)
        await assert_invariants(connection)

    assert job["status"] == "failed_embedding"
    assert job["last_error"]["code"] == "embedding_request_rejected"
    assert "HTTP 400" in job["last_error"]["message"]
    assert "'$.input' is invalid." in job["last_error"]["message"]
    assert retries == []
    assert len(claims) == 1
    assert len(embedding_api.embedding_requests()) == 1


BAD_BATCHES = [
    pytest.param(Reply(missing_vectors=1), id="one-vector-short"),
    pytest.param(Reply(dimensions=DIMENSIONS - 1), id="383-dimensions"),
    pytest.param(Reply(first_value=math.nan), id="nan"),
    pytest.param(Reply(first_value=1e300), id="float32-overflow"),
]


@pytest.mark.parametrize("bad_reply", BAD_BATCHES)
async def test_bad_batch_stores_nothing(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer, bad_reply: Reply
) -> None:
    batch_size = 4
    # The first batch succeeds and every later request gets the bad reply.
    embedding_api.script(Reply(), then=bad_reply)
    await cluster.start_all(
        embedder=embedder_settings(
            embedding_api, embed_batch_size=batch_size, max_retries=1
        )
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(4, paragraphs=120), "long.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (job,) = await wait_terminal(connection, [job_id])
        texts = await chunk_texts(connection)
        stored_ords = await buffered_vector_ords(connection)
        retries = await retry_events(connection, job_id)
        searchable = await connection.fetchval("SELECT count(*) FROM document_chunks")
        await assert_invariants(connection)

    assert len(texts) > 2 * batch_size, "the document needs at least three batches"
    assert job["status"] == "failed_embedding"
    assert job["last_error"]["code"] == "invalid_embedding"
    assert [event["detail"]["code"] for event in retries] == ["invalid_embedding"]
    requests = embedding_api.embedding_requests()
    assert [request.inputs for request in requests] == [
        texts[:batch_size],
        texts[batch_size : 2 * batch_size],
        texts[batch_size : 2 * batch_size],
    ]
    # The first batch's rows stay, and the bad second batch left none.
    assert stored_ords == list(range(batch_size))
    assert job["progress"]["embeds_done"] == batch_size
    assert searchable == 0


async def test_api_key_sent_not_logged(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    key = f"sk-test-{uuid.uuid4().hex}"
    embedding_api.api_key = key
    # A retried error sends the server's body into the logs and last_error.
    embedding_api.script(Reply.error(503))
    await cluster.start_all(
        embedder=embedder_settings(embedding_api, embed_api_key=key)
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(5), "five.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (job,) = await wait_terminal(connection, [job_id])
        events = await events_of(connection, job_id)
        await assert_invariants(connection)

    assert job["status"] == "complete", job["last_error"]
    requests = embedding_api.embedding_requests()
    assert len(requests) == 2
    for request in requests:
        assert request.authorization == f"Bearer {key}"
    for process in cluster.processes:
        assert key not in process.log_path.read_text(errors="replace"), process.name
    assert key not in str(job["last_error"])
    assert all(key not in str(event["detail"]) for event in events)


async def test_wrong_api_key_fails(
    cluster: Cluster, pool, embedding_api: EmbeddingsServer
) -> None:
    key = f"sk-test-{uuid.uuid4().hex}"
    embedding_api.api_key = f"sk-other-{uuid.uuid4().hex}"
    # The 401 body repeats the rejected key, which must not reach the logs.
    embedding_api.echo_rejected_key = True
    await cluster.start_all(
        embedder=embedder_settings(embedding_api, embed_api_key=key)
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(6), "six.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        (job,) = await wait_terminal(connection, [job_id])
        retries = await retry_events(connection, job_id)
        await assert_invariants(connection)

    assert job["status"] == "failed_embedding"
    assert job["last_error"]["code"] == "embedding_request_rejected"
    assert "HTTP 401" in job["last_error"]["message"]
    assert "INGESTD_EMBED_API_KEY" in job["last_error"]["message"]
    assert retries == []
    assert [request.status for request in embedding_api.embedding_requests()] == [401]
    assert "[redacted]" in job["last_error"]["message"]
    assert key not in str(job["last_error"])
    for process in cluster.processes:
        assert key not in process.log_path.read_text(errors="replace"), process.name
