"""A PostgreSQL restart in the middle of a backlog loses and duplicates nothing.

The test runs its own embedded server, so stopping it leaves the session's
shared server alone. The services must ride out the outage in place: same
processes, still SERVING, pools and LISTEN connections reconnected, and the
backlog drained to complete.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from shared.db import connect
from tests.fault.conftest import (
    SERVING,
    Cluster,
    DedicatedPostgres,
    ServiceProcess,
    assert_invariants,
    document_text,
    health_status,
    upload,
    wait_terminal,
)

pytestmark = pytest.mark.fault

BACKLOG = 200
UPLOADS_AFTER_RESTART = 5
# Long enough that every reconnect loop meets refused connections a few times.
DOWNTIME_SECONDS = 3.0
CHANNEL = "ingestd_jobs_v1"


@pytest.fixture
def database_url(dedicated_postgres: DedicatedPostgres) -> str:
    """Point settings, pool and cluster at the dedicated server."""
    return dedicated_postgres.url


async def upload_many(cluster: Cluster, indexes: range) -> list[str]:
    """Upload one small document per index, eight at a time, and return the job ids."""
    limit = asyncio.Semaphore(8)

    async def one(channel, index: int) -> str:
        async with limit:
            response = await upload(channel, document_text(index), f"doc-{index}.md")
            return response.job.job_id

    async with cluster.channel() as channel:
        return list(await asyncio.gather(*(one(channel, i) for i in indexes)))


async def wait_for_probe(
    url: str, processes: list[ServiceProcess], limit_seconds: float = 60.0
) -> None:
    """Send a malformed notification until every process's listener logs it.

    A listener that receives a payload that is not JSON logs
    listener_bad_payload with the payload, which proves its LISTEN works.
    """
    payload = f"listen-probe-{time.monotonic_ns()}"
    deadline = time.monotonic() + limit_seconds
    connection = await asyncpg.connect(url)
    try:
        while time.monotonic() < deadline:
            await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
            await asyncio.sleep(0.5)
            received_by = [
                any(
                    record.get("payload") == payload
                    for record in process.events("listener_bad_payload")
                )
                for process in processes
            ]
            if all(received_by):
                return
    finally:
        await connection.close()
    deaf = [
        process.name
        for process, ok in zip(processes, received_by, strict=True)
        if not ok
    ]
    raise AssertionError(f"listeners of {deaf} never received the probe notification")


def listener_events(process: ServiceProcess) -> list[str]:
    """The listener_lost and listener_connected events of a process, in log order."""
    return [
        record["event"]
        for record in process.events()
        if record.get("event") in ("listener_lost", "listener_connected")
    ]


async def test_restart_drains_backlog(
    cluster: Cluster, dedicated_postgres: DedicatedPostgres
) -> None:
    # The backlog arrives faster, and with more uploads open at once, than
    # the default per-user limits allow. Four parses at a time drain it
    # sooner and hold more leases at the restart.
    processes = list(
        await cluster.start_all(
            gateway={
                "rate_limit": "1000/second",
                "max_concurrent_uploads_per_user": 8,
                "max_concurrent_jobs": 4,
            }
        )
    )
    url = dedicated_postgres.url

    job_ids = await upload_many(cluster, range(BACKLOG))
    assert len(set(job_ids)) == BACKLOG

    connection = await asyncpg.connect(url)
    try:
        before = dict(
            await connection.fetch(
                "SELECT status, count(*) FROM upload_jobs GROUP BY status"
            )
        )
    finally:
        await connection.close()
    pending = BACKLOG - before.get("complete", 0)

    stopped_at = time.monotonic()
    await asyncio.to_thread(dedicated_postgres.stop)
    await asyncio.sleep(DOWNTIME_SECONDS)
    await asyncio.to_thread(dedicated_postgres.start)
    downtime = time.monotonic() - stopped_at

    # The restart hit the pipeline with most of the backlog unfinished.
    assert pending >= BACKLOG // 2, f"only {pending} jobs pending at restart: {before}"

    await wait_for_probe(url, processes)
    job_ids += await upload_many(
        cluster, range(BACKLOG, BACKLOG + UPLOADS_AFTER_RESTART)
    )

    connection = await connect(url)
    try:
        # A hang guard, not a timing check: on a loaded two-core machine the
        # 205 parses, each in a child process, take minutes.
        rows = await wait_terminal(connection, job_ids, limit_seconds=600)
        statuses = {row["status"] for row in rows}
        assert statuses == {"complete"}, [
            (row["status"], row["last_error"])
            for row in rows
            if row["status"] != "complete"
        ]
        report = await assert_invariants(connection)
    finally:
        await connection.close()
    assert report.complete_jobs == BACKLOG + UPLOADS_AFTER_RESTART

    # The original processes are still up and serving, and neither the
    # server nor the worker inside restarted.
    assert len(cluster.processes) == len(processes)
    for process in processes:
        assert process.alive(), f"{process.name} exited:\n{process.log_tail()}"
        assert await health_status(process.port) == SERVING, process.name
        assert len(process.events("service_started")) == 1, process.name
        assert len(process.events("worker_started")) == 1, process.name
        # The LISTEN connection went down with the server and came back.
        events = listener_events(process)
        assert "listener_lost" in events, f"{process.name}: {events}"
        assert events[-1] == "listener_connected", f"{process.name}: {events}"
    print(
        f"\n{pending} of {BACKLOG} jobs pending at restart; statuses {before}; "
        f"database down for {downtime:.1f} s"
    )
