"""Batched hand-offs through BaseWorker.hand_off against a real database.

A worker subclass with no stage work hands each claimed chunk-stage job
straight to chunks_stored. The scenarios take one job's lease away in the
middle of a batch, and stop a worker while a hand-off waits in its buffer.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from shared.config import Settings
from shared.jobs import CHUNK_STAGE, NOTIFY_CHANNEL, ClaimedJob, Lease, Status
from shared.notify import JobListener
from shared.worker import BaseWorker
from tests.fault.conftest import assert_invariants

pytestmark = pytest.mark.fault

# Guards against a hang only.
LIMIT_SECONDS = 60

# Jobs waiting for the chunk stage, each with the event that put it there,
# so the invariant checker can replay its chain. Their progress records a
# document of no chunks, which a job in chunks_stored must agree with.
INSERT_JOBS_SQL = """
WITH docs AS (
    INSERT INTO documents (document_id, user_id, content_type, byte_size, raw_sha256, raw_path)
    SELECT gen_random_uuid(), 'hand-off', 'text/plain', 1, md5(n::text), 'raw/hand-off/' || n
    FROM generate_series(1, $1::int) AS n
    RETURNING document_id, raw_path
),
created AS (
    INSERT INTO upload_jobs
        (job_id, user_id, document_id, status, raw_path, chunker_name, chunker_version,
         embed_model, embed_version, progress)
    SELECT gen_random_uuid(), 'hand-off', document_id, 'parse_validated', raw_path,
           'noop', 'noop-1', 'noop', 'noop-1', '{"chunks_total": 0}'::jsonb
    FROM docs
    RETURNING job_id
),
events AS (
    INSERT INTO job_events (job_id, from_status, to_status, worker, lease_token, detail)
    SELECT job_id, NULL, 'parse_validated', NULL, NULL, '{}'::jsonb FROM created
)
SELECT job_id FROM created
"""

Hook = Callable[[ClaimedJob], Awaitable[None]]


class HandOffWorker(BaseWorker):
    """Runs a test hook for each job, then hands the job off to chunks_stored."""

    spec = CHUNK_STAGE

    def __init__(self, *, before_hand_off: Hook, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._before_hand_off = before_hand_off

    async def process(self, job: ClaimedJob, lease: Lease) -> None:
        await self._before_hand_off(job)
        await self.hand_off(lease, Status.CHUNKS_STORED, detail={"step": "test"})


@pytest.fixture
async def listener(settings: Settings) -> AsyncIterator[JobListener]:
    assert settings.database_url is not None
    listener = JobListener(settings.database_url, service="test")
    listener.start()
    await asyncio.wait_for(listener.connected.wait(), timeout=LIMIT_SECONDS)
    yield listener
    await listener.stop()


async def insert_jobs(pool: asyncpg.Pool, count: int) -> list[uuid.UUID]:
    async with pool.acquire() as connection:
        rows = await connection.fetch(INSERT_JOBS_SQL, count)
    return [row["job_id"] for row in rows]


def make_worker(
    settings: Settings,
    pool: asyncpg.Pool,
    listener: JobListener,
    before_hand_off: Hook,
    **overrides: Any,
) -> HandOffWorker:
    assert settings.database_url is not None
    return HandOffWorker(
        before_hand_off=before_hand_off,
        pool=pool,
        database_url=settings.database_url,
        settings=settings.model_copy(update=overrides),
        listener=listener,
    )


async def wait_until(condition: Callable[[], bool], description: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT_SECONDS
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{description} did not happen in {LIMIT_SECONDS} s")
        await asyncio.sleep(0.02)


async def job_rows(
    pool: asyncpg.Pool, job_ids: list[uuid.UUID]
) -> dict[uuid.UUID, asyncpg.Record]:
    async with pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT * FROM upload_jobs WHERE job_id = ANY($1::uuid[])", job_ids
        )
    return {row["job_id"]: row for row in rows}


async def hand_off_events(
    pool: asyncpg.Pool, job_ids: list[uuid.UUID]
) -> list[asyncpg.Record]:
    async with pool.acquire() as connection:
        return await connection.fetch(
            """
            SELECT * FROM job_events
            WHERE job_id = ANY($1::uuid[]) AND to_status = 'chunks_stored'
            ORDER BY event_id
            """,
            job_ids,
        )


async def test_lost_lease_skips_one_job(
    settings: Settings, pool: asyncpg.Pool, listener: JobListener
) -> None:
    job_ids = await insert_jobs(pool, 3)
    victim = job_ids[1]
    thief_token = uuid.uuid4()
    payloads: list[dict[str, Any]] = []

    async def steal_victims_lease(job: ClaimedJob) -> None:
        # What a second worker does when it claims the job after the lease
        # expired: the job stays in chunking under a new token.
        if job.job_id == victim:
            async with pool.acquire() as connection:
                await connection.execute(
                    "UPDATE upload_jobs SET lease_token = $2, leased_by = 'thief' "
                    "WHERE job_id = $1",
                    victim,
                    thief_token,
                )

    assert settings.database_url is not None
    watcher = await asyncpg.connect(settings.database_url)
    await watcher.add_listener(
        NOTIFY_CHANNEL, lambda *args: payloads.append(json.loads(args[3]))
    )
    # One claim of all three jobs, and a batch that waits for all three.
    worker = make_worker(
        settings,
        pool,
        listener,
        steal_victims_lease,
        claim_batch_size=3,
        max_concurrent_jobs=3,
        hand_off_batch_size=3,
        hand_off_max_delay_seconds=1.0,
    )
    runner = asyncio.create_task(worker.run())
    try:
        await wait_until(
            lambda: worker.counters.succeeded + worker.counters.leases_lost == 3,
            "three finished jobs",
        )
        await wait_until(
            lambda: any("job_ids" in payload for payload in payloads),
            "the hand-off notification",
        )
    finally:
        await worker.drain(5)
        await runner
        await watcher.close()

    assert worker.counters.succeeded == 2
    assert worker.counters.leases_lost == 1
    moved = [job_id for job_id in job_ids if job_id != victim]
    rows = await job_rows(pool, job_ids)
    for job_id in moved:
        assert rows[job_id]["status"] == "chunks_stored"
        assert rows[job_id]["lease_token"] is None
        assert rows[job_id]["leased_by"] is None
        assert rows[job_id]["attempts"] == 0
    assert rows[victim]["status"] == "chunking"
    assert rows[victim]["lease_token"] == thief_token
    assert rows[victim]["leased_by"] == "thief"

    events = await hand_off_events(pool, job_ids)
    assert sorted(event["job_id"] for event in events) == sorted(moved)
    assert {event["from_status"] for event in events} == {"chunking"}
    assert {event["worker"] for event in events} == {worker.worker_id}
    assert {event["detail"]["step"] for event in events} == {"test"}
    # now() is the transaction's start, so equal times mean one statement.
    assert len({event["created_at"] for event in events}) == 1

    batched = [payload for payload in payloads if "job_ids" in payload]
    assert len(batched) == 1
    assert batched[0]["status"] == "chunks_stored"
    assert sorted(batched[0]["job_ids"]) == sorted(str(job_id) for job_id in moved)
    async with pool.acquire() as connection:
        await assert_invariants(connection)


async def test_drain_flushes_waiting_hand_off(
    settings: Settings, pool: asyncpg.Pool, listener: JobListener
) -> None:
    quick, slow = await insert_jobs(pool, 2)
    quick_waiting = asyncio.Event()
    slow_started = asyncio.Event()

    async def hold_slow_job(job: ClaimedJob) -> None:
        if job.job_id == quick:
            quick_waiting.set()
            return
        slow_started.set()
        # Runs until drain cancels it, so the quick job's hand-off cannot
        # flush for lack of other busy jobs, only for the delay or the drain.
        await asyncio.Event().wait()

    worker = make_worker(
        settings,
        pool,
        listener,
        hold_slow_job,
        claim_batch_size=2,
        max_concurrent_jobs=2,
        hand_off_batch_size=100,
        hand_off_max_delay_seconds=1.0,
    )
    runner = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(quick_waiting.wait(), timeout=LIMIT_SECONDS)
        await asyncio.wait_for(slow_started.wait(), timeout=LIMIT_SECONDS)
    finally:
        await worker.drain(grace_seconds=0.5)
        await runner

    rows = await job_rows(pool, [quick, slow])
    assert rows[quick]["status"] == "chunks_stored"
    assert rows[quick]["lease_token"] is None
    assert [event["job_id"] for event in await hand_off_events(pool, [quick])] == [
        quick
    ]
    # The slow job outlived the grace period and went back to its queue.
    assert rows[slow]["status"] == "parse_validated"
    assert rows[slow]["lease_token"] is None
    assert worker.counters.succeeded == 1
    assert worker.counters.released == 1
    async with pool.acquire() as connection:
        await assert_invariants(connection)
