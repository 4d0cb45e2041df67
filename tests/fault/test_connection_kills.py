"""Database connections terminated again and again lose and duplicate nothing.

For a bounded period the test terminates every backend of the test database
except its own, the services' pools, heartbeat pools and LISTEN connections
included, while documents are uploaded and processed. After the killing
stops, every job completes in the same service processes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.config import Settings
from shared.db import connect
from tests.fault.conftest import (
    SERVING,
    Cluster,
    assert_invariants,
    document_text,
    health_status,
    upload,
    wait_terminal,
)

pytestmark = pytest.mark.fault

DOCUMENTS = 50
KILL_SECONDS = 15.0
KILL_INTERVAL_SECONDS = 0.75
# Uploads are spread over most of the killing period.
UPLOAD_INTERVAL_SECONDS = 0.2

TERMINATE_SQL = """
SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


async def upload_spread(cluster: Cluster) -> list[str]:
    """Upload one document every UPLOAD_INTERVAL_SECONDS and return the job ids."""

    async def one(channel, index: int) -> str:
        await asyncio.sleep(index * UPLOAD_INTERVAL_SECONDS)
        response = await upload(channel, document_text(index), f"doc-{index}.md")
        return response.job.job_id

    async with cluster.channel() as channel:
        return list(await asyncio.gather(*(one(channel, i) for i in range(DOCUMENTS))))


async def test_killed_connections_recover(cluster: Cluster, settings: Settings) -> None:
    # Uploads stalled by a killed connection may overlap: more of them may be
    # open at once than one user may have by default.
    processes = list(
        await cluster.start_all(gateway={"max_concurrent_uploads_per_user": 16})
    )
    assert settings.database_url is not None
    # The killer's own connection is the one backend it spares, so the test
    # also reads its results through it.
    connection = await connect(settings.database_url)
    try:
        uploads = asyncio.create_task(upload_spread(cluster))
        terminated: list[int] = []
        deadline = time.monotonic() + KILL_SECONDS
        while time.monotonic() < deadline:
            terminated.append(await connection.fetchval(TERMINATE_SQL))
            await asyncio.sleep(KILL_INTERVAL_SECONDS)
        job_ids = await uploads
        unfinished_when_killing_stopped = await connection.fetchval(
            "SELECT count(*) FROM upload_jobs WHERE status <> 'complete'"
        )

        assert len(set(job_ids)) == DOCUMENTS
        rows = await wait_terminal(connection, job_ids, limit_seconds=120)
        failed = {
            str(row["job_id"]): (row["status"], row["last_error"])
            for row in rows
            if row["status"] != "complete"
        }
        assert not failed, failed
        report = await assert_invariants(connection)
    finally:
        await connection.close()
    assert report.complete_jobs == DOCUMENTS

    # The killing reached the services' connections, round after round.
    rounds_with_kills = sum(1 for count in terminated if count > 0)
    assert rounds_with_kills >= len(terminated) // 2, terminated
    # The original processes survived it, and neither the server nor the
    # worker inside restarted.
    assert len(cluster.processes) == len(processes)
    for process in processes:
        assert process.alive(), f"{process.name} exited:\n{process.log_tail()}"
        assert await health_status(process.port) == SERVING, process.name
        assert len(process.events("service_started")) == 1, process.name
        assert len(process.events("worker_started")) == 1, process.name
        # Each LISTEN connection was among the terminated and came back.
        assert process.events("listener_lost"), process.name
        events = [
            record["event"]
            for record in process.events()
            if record.get("event") in ("listener_lost", "listener_connected")
        ]
        assert events[-1] == "listener_connected", f"{process.name}: {events}"
    print(
        f"\n{sum(terminated)} backends terminated in {len(terminated)} rounds; "
        f"{unfinished_when_killing_stopped} of {DOCUMENTS} jobs unfinished when "
        "the killing stopped"
    )
