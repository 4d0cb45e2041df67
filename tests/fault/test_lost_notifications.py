"""Workers pick up jobs by polling when every notification is lost.

The suppression changes no product code: a no-op ``public.pg_notify(text,
text)`` and a database-level ``search_path`` of ``public, pg_catalog`` make
every unqualified ``SELECT pg_notify(...)`` call the no-op. The test checks
that a LISTEN connection then receives nothing, runs documents through the
pipeline, and bounds each hand-off's pickup delay by the poll interval. The
control test shows that with notifications working, a hand-off is picked up
long before the poll interval runs out.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime

import asyncpg
import pytest

from shared.config import Settings
from shared.db import connect
from shared.jobs import NOTIFY_CHANNEL
from tests.fault.conftest import (
    Cluster,
    assert_invariants,
    document_text,
    events_of,
    upload,
    wait_for,
)

pytestmark = pytest.mark.fault

DOCUMENTS = 3
# Slack on top of the poll interval for the claim query and a busy event
# loop on a loaded machine.
PICKUP_SLACK_SECONDS = 2.5
# Hand-off statuses, each claimed by the next stage.
HAND_OFFS = ("uploaded", "parse_validated", "chunks_stored")

SUPPRESS_NOTIFY_SQL = """
CREATE FUNCTION public.pg_notify(channel text, payload text) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN END $$
"""


def every_service(**settings: object) -> dict[str, dict[str, object]]:
    """Return the same settings for the gateway, chunker and embedder."""
    return {name: dict(settings) for name in ("gateway", "chunker", "embedder")}


async def suppress_notifications(connection: asyncpg.Connection) -> None:
    """Make unqualified pg_notify calls in new connections a no-op."""
    await connection.execute(SUPPRESS_NOTIFY_SQL)
    database = await connection.fetchval("SELECT quote_ident(current_database())")
    await connection.execute(
        f"ALTER DATABASE {database} SET search_path = public, pg_catalog"
    )


async def open_listener(url: str) -> tuple[asyncpg.Connection, list[str]]:
    """LISTEN on the job channel, and return the connection and the list it appends payloads to."""
    received: list[str] = []
    connection = await asyncpg.connect(url)
    await connection.add_listener(
        NOTIFY_CHANNEL, lambda _c, _pid, _channel, payload: received.append(payload)
    )
    return connection, received


async def wait_until(received: list[str], payload: str, seconds: float) -> bool:
    """Return whether payload arrives within seconds."""
    for _ in range(int(seconds * 10)):
        if payload in received:
            return True
        await asyncio.sleep(0.1)
    return payload in received


async def pickup_delays(
    connection: asyncpg.Connection, job_id: str
) -> dict[str, float]:
    """Seconds from each hand-off event to the next stage's claim of the job."""
    handed_off: dict[str, datetime] = {}
    claimed: dict[str, datetime] = {}
    for event in await events_of(connection, job_id):
        if event["to_status"] in HAND_OFFS:
            handed_off.setdefault(event["to_status"], event["created_at"])
        if event["detail"].get("action") == "claim":
            claimed.setdefault(event["from_status"], event["created_at"])
    assert set(handed_off) == set(HAND_OFFS), handed_off
    assert set(claimed) >= set(HAND_OFFS), claimed
    return {
        status: (claimed[status] - handed_off[status]).total_seconds()
        for status in HAND_OFFS
    }


async def run_documents_one_by_one(
    cluster: Cluster, connection: asyncpg.Connection
) -> list[str]:
    """Upload each document once the previous one is complete, and return the job ids.

    Uploading one at a time keeps every stage idle and waiting when a job
    reaches it.
    """
    job_ids = []
    async with cluster.channel() as channel:
        for index in range(DOCUMENTS):
            response = await upload(channel, document_text(index), f"doc-{index}.md")
            job_id = response.job.job_id
            await wait_for(
                connection,
                [job_id],
                lambda row: row["status"] == "complete",
                limit_seconds=90,
                description="complete",
            )
            job_ids.append(job_id)
    return job_ids


async def test_polling_without_notifications(
    cluster: Cluster, settings: Settings
) -> None:
    poll_seconds = 2.0
    url = settings.database_url
    assert url is not None
    admin = await asyncpg.connect(url)
    try:
        await suppress_notifications(admin)
    finally:
        await admin.close()

    # The suppression works on a fresh connection, as the services will open.
    listener, received = await open_listener(url)
    sender = await asyncpg.connect(url)
    try:
        await sender.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, "suppressed")
        assert not await wait_until(received, "suppressed", 1.0)
        await sender.execute(
            "SELECT pg_catalog.pg_notify($1, $2)", NOTIFY_CHANNEL, "delivered"
        )
        assert await wait_until(received, "delivered", 5.0)
    finally:
        await sender.close()

    await cluster.start_all(**every_service(poll_interval_seconds=poll_seconds))
    connection = await connect(url)
    try:
        job_ids = await run_documents_one_by_one(cluster, connection)
        delays = {job_id: await pickup_delays(connection, job_id) for job_id in job_ids}
        report = await assert_invariants(connection)
    finally:
        await connection.close()
        await listener.close()

    # The services' notifications never reached the channel.
    assert received == ["delivered"]
    assert report.complete_jobs == DOCUMENTS
    bound = poll_seconds + PICKUP_SLACK_SECONDS
    for job_id, by_status in delays.items():
        for status, delay in by_status.items():
            assert delay <= bound, (
                f"job {job_id} waited {delay:.2f} s in {status}, more than the "
                f"{poll_seconds:g} s poll interval plus {PICKUP_SLACK_SECONDS:g} s"
            )
    print(f"\npickup delays with notifications lost: {format_delays(delays)}")


async def test_notifications_wake_workers(cluster: Cluster, settings: Settings) -> None:
    poll_seconds = 10.0
    # Far below the poll interval, so only a notification explains the pickup.
    woken_within_seconds = 2.0
    await cluster.start_all(**every_service(poll_interval_seconds=poll_seconds))
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    try:
        job_ids = await run_documents_one_by_one(cluster, connection)
        delays = {job_id: await pickup_delays(connection, job_id) for job_id in job_ids}
        report = await assert_invariants(connection)
    finally:
        await connection.close()

    assert report.complete_jobs == DOCUMENTS
    for job_id, by_status in delays.items():
        for status, delay in by_status.items():
            assert delay <= woken_within_seconds, (
                f"job {job_id} waited {delay:.2f} s in {status} with notifications "
                f"on and a {poll_seconds:g} s poll interval"
            )
    print(f"\npickup delays with notifications: {format_delays(delays)}")


def format_delays(delays: dict[str, dict[str, float]]) -> str:
    return json.dumps(
        {
            str(uuid.UUID(job_id))[:8]: {s: round(d, 2) for s, d in by_status.items()}
            for job_id, by_status in delays.items()
        }
    )
