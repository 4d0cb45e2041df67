"""A worker killed with SIGKILL at each step of each stage loses nothing.

A failpoint parks the first replica at one exact step while it holds the
job's lease. The test kills it with SIGKILL and starts a second replica,
which claims the job once the lease has expired and finishes it from the
last durable step.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.fault.conftest import (
    Cluster,
    assert_invariants,
    document_text,
    events_of,
    upload,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.fault

CASES = [
    pytest.param("gateway", "parse.before_store", "parse_queued", id="parse"),
    pytest.param("chunker", "chunk.before_store", "chunking", id="chunk"),
    pytest.param(
        "embedder", "embed.batch_stored", "embedding_in_progress", id="embed-mid-batch"
    ),
    pytest.param(
        "embedder", "embed.before_finalize", "embeddings_stored", id="finalize"
    ),
]
STAGE_OF = {"gateway": "parse", "chunker": "chunk", "embedder": "embed"}


@pytest.mark.parametrize(("service", "failpoint", "held_status"), CASES)
async def test_sigkill_mid_stage(
    cluster: Cluster, pool, service: str, failpoint: str, held_status: str
) -> None:
    overrides = {
        "gateway": {},
        "chunker": {},
        # Small batches, so the document needs several of them.
        "embedder": {"embed_batch_size": 8},
    }
    overrides[service]["failpoints"] = f"{failpoint}=pause"
    processes = dict(
        zip(
            ("gateway", "chunker", "embedder"),
            await cluster.start_all(**overrides),
            strict=True,
        )
    )
    victim = processes[service]
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(1, paragraphs=120), "long.md")
    job_id = response.job.job_id

    async with pool.acquire() as connection:
        await wait_for(
            connection,
            [job_id],
            lambda row: row["status"] == held_status,
            description=held_status,
        )
        # Parked at the failpoint: the lease is held and nothing moves.
        deadline = time.monotonic() + 60
        while not victim.events("failpoint") and time.monotonic() < deadline:
            await connection.execute("SELECT pg_sleep(0.1)")
        assert victim.events("failpoint"), victim.log_tail()
        lease_row = await connection.fetchrow(
            "SELECT status, leased_by, lease_token FROM upload_jobs WHERE job_id = $1",
            uuid.UUID(job_id),
        )
        assert lease_row["status"] == held_status
        assert lease_row["leased_by"] in victim.worker_ids()
        vectors_before = await connection.fetch(
            "SELECT chunk_id, xmin::text AS version FROM document_vector_buffer"
        )
        if failpoint == "embed.batch_stored":
            assert len(vectors_before) == 8

        killed_at = time.monotonic()
        victim.kill()
        replacement = cluster.spawn(
            service,
            **{
                key: value
                for key, value in overrides[service].items()
                if key != "failpoints"
            },
        )
        await replacement.wait_serving()
        rows = await wait_terminal(connection, [job_id])
        recovered_after = time.monotonic() - killed_at
        assert rows[0]["status"] == "complete", rows[0]["last_error"]

        events = await events_of(connection, job_id)
        stage_claims = [
            event
            for event in events
            if event["detail"].get("action") == "claim"
            and event["worker"].startswith(STAGE_OF[service] + "@")
        ]
        assert [claim["detail"]["attempt"] for claim in stage_claims] == [1, 2]
        assert stage_claims[0]["worker"] in victim.worker_ids()
        assert stage_claims[1]["worker"] in replacement.worker_ids()
        assert stage_claims[1]["from_status"] == held_status

        # Vectors stored before the kill were kept, not written again.
        vectors_after = {
            row["chunk_id"]: row["version"]
            for row in await connection.fetch(
                "SELECT chunk_id, xmin::text AS version FROM document_vector_buffer"
            )
        }
        for row in vectors_before:
            assert vectors_after[row["chunk_id"]] == row["version"]

        report = await assert_invariants(connection)
    assert report.complete_jobs == 1
    print(
        f"\n{service} killed at {failpoint}: complete {recovered_after:.1f} s after "
        f"SIGKILL with a {cluster.base_env['INGESTD_LEASE_SECONDS']} s lease"
    )
