"""Frozen, overloaded, stopped and crashing workers, as separate processes."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sys
import time
import uuid

import asyncpg
import pytest

from shared import ids
from tests.fault.conftest import (
    NOT_SERVING,
    Cluster,
    ServiceProcess,
    assert_invariants,
    document_text,
    events_of,
    health_status,
    upload,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.fault

LEASE_SECONDS = 4.0


async def wait_logged(
    process: ServiceProcess, event: str, limit_seconds: float = 60.0
) -> dict:
    """Wait until the process logged a record with this event name."""
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        records = process.events(event)
        if records:
            return records[0]
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"{process.name} logged no {event} in {limit_seconds} s:\n{process.log_tail()}"
    )


def claims_by_stage(events: list[asyncpg.Record], stage: str) -> list[asyncpg.Record]:
    return [
        event
        for event in events
        if event["detail"].get("action") == "claim"
        and event["worker"].startswith(f"{stage}@")
    ]


async def vector_versions(connection: asyncpg.Connection) -> dict[uuid.UUID, str]:
    rows = await connection.fetch(
        "SELECT chunk_id, xmin::text AS version FROM document_vector_buffer"
    )
    return {row["chunk_id"]: row["version"] for row in rows}


async def test_zombie_worker_writes_nothing(cluster: Cluster, pool) -> None:
    # The first embedder parks after its first batch, holding the lease.
    _gateway, _chunker, zombie = await cluster.start_all(
        embedder={"failpoints": "embed.batch_stored=sleep(12)", "embed_batch_size": 4}
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(7, paragraphs=80), "z.md")
    job_id = response.job.job_id
    await wait_logged(zombie, "failpoint")

    zombie.signal(signal.SIGSTOP)
    async with pool.acquire() as connection:
        frozen_at = await connection.fetchval("SELECT now()")
        survivor = cluster.spawn("embedder", embed_batch_size=4)
        await survivor.wait_serving()
        rows = await wait_terminal(connection, [job_id])
        assert rows[0]["status"] == "complete", rows[0]["last_error"]
        settled = await vector_versions(connection)
        searchable = await connection.fetchval("SELECT count(*) FROM document_chunks")

        zombie.signal(signal.SIGCONT)
        lost = await wait_logged(zombie, "lease_lost")
        assert lost["job_id"] == job_id
        # Give the resumed zombie time to try whatever it had left.
        await asyncio.sleep(LEASE_SECONDS / 2)

        assert await vector_versions(connection) == settled
        assert await connection.fetchval("SELECT count(*) FROM document_chunks") == (
            searchable
        )
        events = await events_of(connection, job_id)
        zombie_workers = zombie.worker_ids()
        late = [
            event
            for event in events
            if event["worker"] in zombie_workers and event["created_at"] > frozen_at
        ]
        assert late == []
        claims = claims_by_stage(events, "embed")
        assert [claim["worker"] in zombie_workers for claim in claims] == [True, False]
        assert zombie.alive()
        await assert_invariants(connection)


async def test_heartbeat_survives_cpu_load(cluster: Cluster, pool) -> None:
    # The stage keeps a worker thread busy in pure Python for twice the
    # lease while two more processes load every core.
    burn_seconds = 2 * LEASE_SECONDS
    _gateway, busy, _embedder = await cluster.start_all(
        chunker={"failpoints": f"chunk.before_store=burn({burn_seconds})"}
    )
    hogs = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
        for _ in range(2)
    ]
    try:
        async with cluster.channel() as channel:
            response = await upload(channel, document_text(11), "busy.md")
        job_id = response.job.job_id
        await wait_logged(busy, "failpoint")
        # A second replica is ready to take the job if the lease ever lapses.
        rival = cluster.spawn("chunker")
        heartbeats: set = set()
        async with pool.acquire() as connection:
            started = time.monotonic()
            while time.monotonic() - started < burn_seconds + 2:
                row = await connection.fetchrow(
                    "SELECT status, heartbeat_at FROM upload_jobs WHERE job_id = $1",
                    uuid.UUID(job_id),
                )
                if row["status"] != "chunking":
                    break
                heartbeats.add(row["heartbeat_at"])
                await asyncio.sleep(0.25)
            rows = await wait_terminal(connection, [job_id])
            events = await events_of(connection, job_id)
            await assert_invariants(connection)
    finally:
        for hog in hogs:
            hog.kill()
            await hog.wait()

    assert rows[0]["status"] == "complete", rows[0]["last_error"]
    # A heartbeat every quarter lease: at least five renewals in two leases.
    assert len(heartbeats) >= 5
    claims = claims_by_stage(events, "chunk")
    assert len(claims) == 1
    assert claims[0]["worker"] in busy.worker_ids()
    assert busy.events("lease_lost") == []
    assert rival.events("job_claimed") == []


async def test_sigterm_lets_short_stage_finish(cluster: Cluster, pool) -> None:
    _gateway, draining, _embedder = await cluster.start_all(
        chunker={"failpoints": "chunk.before_store=sleep(2)"}
    )
    async with cluster.channel() as channel:
        first = await upload(channel, document_text(21), "first.md")
        await wait_logged(draining, "failpoint")

        draining.signal(signal.SIGTERM)
        async with pool.acquire() as connection:
            signalled_at = await connection.fetchval("SELECT now()")
        assert await health_status(draining.port) == NOT_SERVING
        second = await upload(channel, document_text(22), "second.md")

        assert await draining.wait_exit() == 0
    async with pool.acquire() as connection:
        first_row = (
            await wait_for(
                connection,
                [first.job.job_id],
                lambda row: row["status"] not in ("parse_validated", "chunking"),
                description="past chunking",
            )
        )[0]
        assert first_row["status"] in ("chunks_stored", "embedding_queued", "complete")
        events = await events_of(connection, first.job.job_id)
        stored = [event for event in events if event["to_status"] == "chunks_stored"]
        assert stored[0]["worker"] in draining.worker_ids()

        # Nothing was claimed by the draining worker after the signal.
        second_row = await connection.fetchrow(
            "SELECT status FROM upload_jobs WHERE job_id = $1",
            uuid.UUID(second.job.job_id),
        )
        assert second_row["status"] in (
            "uploaded",
            "parse_queued",
            "parsed",
            "parse_validated",
        )
        late_claims = await connection.fetchval(
            """
            SELECT count(*) FROM job_events
            WHERE worker = ANY($1::text[]) AND created_at > $2
              AND detail->>'action' = 'claim'
            """,
            list(draining.worker_ids()),
            signalled_at,
        )
        assert late_claims == 0

        replacement = cluster.spawn("chunker")
        await replacement.wait_serving()
        rows = await wait_terminal(connection, [first.job.job_id, second.job.job_id])
        assert [row["status"] for row in rows] == ["complete", "complete"]
        await assert_invariants(connection)


async def test_sigterm_releases_long_stage(cluster: Cluster, pool) -> None:
    _gateway, draining, _embedder = await cluster.start_all(
        chunker={
            "failpoints": "chunk.before_store=sleep(60)",
            "shutdown_grace_seconds": 2,
        }
    )
    async with cluster.channel() as channel:
        response = await upload(channel, document_text(31), "long.md")
    job_id = response.job.job_id
    await wait_logged(draining, "failpoint")

    draining.signal(signal.SIGTERM)
    assert await health_status(draining.port) == NOT_SERVING
    assert await draining.wait_exit(limit_seconds=30) == 0
    released = draining.events("job_released")
    assert [record["job_id"] for record in released] == [job_id]

    async with pool.acquire() as connection:
        row = await connection.fetchrow(
            "SELECT * FROM upload_jobs WHERE job_id = $1", uuid.UUID(job_id)
        )
        assert row["status"] == "parse_validated"
        assert row["attempts"] == 0
        assert row["lease_token"] is None
        assert row["leased_by"] is None

        replacement = cluster.spawn("chunker")
        await replacement.wait_serving()
        rows = await wait_terminal(connection, [job_id])
        assert rows[0]["status"] == "complete", rows[0]["last_error"]
        claims = claims_by_stage(await events_of(connection, job_id), "chunk")
        # The released attempt was given back, so the next claim is attempt 1.
        assert [claim["detail"]["attempt"] for claim in claims] == [1, 1]
        await assert_invariants(connection)


async def test_poison_documents_fail_alone(cluster: Cluster, pool) -> None:
    crasher = document_text(41)
    raiser = document_text(42)
    crash_id = ids.document_id("local", hashlib.sha256(crasher).hexdigest())
    raise_id = ids.document_id("local", hashlib.sha256(raiser).hexdigest())
    failpoints = f"chunk.start@{crash_id}=crash;chunk.start@{raise_id}=raise"
    # One job per process, so a crash costs an attempt only to the job that
    # caused it.
    chunker_settings = {
        "failpoints": failpoints,
        "max_concurrent_jobs": 1,
        "claim_batch_size": 1,
    }
    # The gateway stamps each new job with its max_attempts.
    await cluster.start_all(gateway={"max_attempts": 3}, chunker=chunker_settings)

    async def restart_dead_chunkers(stop: asyncio.Event) -> int:
        # What a container runtime's restart policy does.
        restarts = 0
        while not stop.is_set():
            live = [
                process
                for process in cluster.processes
                if process.name == "chunker" and process.alive()
            ]
            if not live:
                cluster.spawn("chunker", **chunker_settings)
                restarts += 1
            await asyncio.sleep(0.5)
        return restarts

    stop = asyncio.Event()
    supervisor = asyncio.create_task(restart_dead_chunkers(stop))
    try:
        async with cluster.channel() as channel:
            poison = [
                await upload(channel, crasher, "crash.md"),
                await upload(channel, raiser, "raise.md"),
            ]
            healthy = [
                await upload(channel, document_text(50 + n), f"ok-{n}.md")
                for n in range(4)
            ]
        async with pool.acquire() as connection:
            rows = await wait_terminal(
                connection,
                [response.job.job_id for response in poison + healthy],
                limit_seconds=300,
            )
    finally:
        stop.set()
        restarts = await supervisor

    by_id = {str(row["job_id"]): row for row in rows}
    crashed = by_id[poison[0].job.job_id]
    raised = by_id[poison[1].job.job_id]
    assert crashed["status"] == "failed_chunking"
    assert crashed["last_error"]["code"] == "max_attempts_exceeded"
    assert "claimed 3 times" in crashed["last_error"]["message"]
    assert raised["status"] == "failed_chunking"
    assert raised["last_error"]["code"] == "internal_error"
    assert "FailpointError" in raised["last_error"]["message"]
    assert "3 of 3 attempts" in raised["last_error"]["message"]
    for response in healthy:
        assert by_id[response.job.job_id]["status"] == "complete"
    # Each crash took a chunker process down; the restarts kept the rest flowing.
    assert restarts >= 3
    async with pool.acquire() as connection:
        await assert_invariants(connection)
