"""Global invariants of the job tables, checked after every fault scenario.

The checks read only the database and recompute ids with ``uuid.uuid5``
directly, not through ``shared.ids``, so a bug there cannot hide itself.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import asyncpg

ID_NAMESPACE = uuid.UUID("6c8a1e6e-1f0b-4aa8-9f0a-1a7c2e6f2b42")
TERMINAL = {"complete", "failed_parse", "failed_chunking", "failed_embedding"}
# Every non-terminal status is claimable by exactly one stage: directly when
# it is a hand-off status, after lease expiry when it is an in-flight one.
CLAIMABLE = {
    "uploaded",
    "parse_queued",
    "parsed",
    "parse_validated",
    "chunking",
    "chunks_stored",
    "embedding_queued",
    "embedding_in_progress",
    "embeddings_stored",
}
AFTER_CHUNKING = {
    "chunks_stored",
    "embedding_queued",
    "embedding_in_progress",
    "embeddings_stored",
    "complete",
}


@dataclass
class InvariantReport:
    """What the checker looked at, for assertions on top of the invariants."""

    statuses: dict[str, int] = field(default_factory=dict)
    complete_jobs: int = 0
    searchable_chunks: int = 0
    events: int = 0


def expected_chunk_id(document_id: uuid.UUID, name: str, version: str, ord_: int):
    canonical = f"{document_id}:{name}:{version}:{ord_}".lower()
    return uuid.uuid5(ID_NAMESPACE, canonical)


async def check_invariants(connection: asyncpg.Connection) -> InvariantReport:
    """Assert every global invariant of the pipeline's tables."""
    report = InvariantReport()
    jobs = await connection.fetch("SELECT * FROM upload_jobs ORDER BY created_at")
    for job in jobs:
        report.statuses[job["status"]] = report.statuses.get(job["status"], 0) + 1
        await _check_job_row(job)
        await _check_rows(connection, job, report)
    report.events = await _check_event_chains(connection)
    orphans = await connection.fetchval(
        """
        SELECT count(*) FROM document_chunks AS c
        LEFT JOIN upload_jobs AS j ON j.job_id = c.job_id AND j.status = 'complete'
        WHERE j.job_id IS NULL
        """
    )
    assert orphans == 0, f"{orphans} searchable chunks belong to no complete job"
    return report


async def _check_job_row(job: asyncpg.Record) -> None:
    job_id, status = job["job_id"], job["status"]
    assert status in TERMINAL | CLAIMABLE, f"job {job_id} has unknown status {status}"
    lease_fields = [job["lease_token"], job["leased_by"], job["lease_expires_at"]]
    assert all(value is None for value in lease_fields) or all(
        value is not None for value in lease_fields
    ), f"job {job_id} has a partial lease: {lease_fields}"
    if status in TERMINAL:
        assert job["lease_token"] is None, f"terminal job {job_id} still has a lease"
    assert job["attempts"] <= job["max_attempts"] + 1, (
        f"job {job_id} was claimed {job['attempts']} times, more than max_attempts + 1"
    )


async def _check_rows(
    connection: asyncpg.Connection, job: asyncpg.Record, report: InvariantReport
) -> None:
    job_id, status = job["job_id"], job["status"]
    key = (job["document_id"], job["chunker_name"], job["chunker_version"])
    total = (job["progress"] or {}).get("chunks_total")
    searchable = await connection.fetch(
        "SELECT chunk_id, chunk_ord, vector_sha FROM document_chunks WHERE job_id = $1",
        job_id,
    )
    if status != "complete":
        assert not searchable, f"job {job_id} in {status} has searchable chunks"
    if status not in AFTER_CHUNKING:
        return
    assert total is not None, f"job {job_id} in {status} has no chunks_total"
    archived = job["buffers_archived_at"] is not None
    if not archived:
        chunks = await connection.fetch(
            """
            SELECT chunk_id, chunk_ord FROM document_chunk_buffer
            WHERE document_id = $1 AND chunker_name = $2 AND chunker_version = $3
            ORDER BY chunk_ord
            """,
            *key,
        )
        assert len(chunks) == total, (
            f"job {job_id}: {len(chunks)} buffered chunks, chunks_total {total}"
        )
        assert [row["chunk_ord"] for row in chunks] == list(range(total))
        for row in chunks:
            assert row["chunk_id"] == expected_chunk_id(*key, row["chunk_ord"]), (
                f"job {job_id}: chunk {row['chunk_ord']} has id {row['chunk_id']}, "
                "not the uuid5 of its canonical string"
            )
        vectors = await connection.fetchval(
            """
            SELECT count(*) FROM document_vector_buffer AS v
            JOIN document_chunk_buffer AS c ON c.chunk_id = v.chunk_id
            WHERE c.document_id = $1 AND c.chunker_name = $2 AND c.chunker_version = $3
              AND v.embed_model = $4 AND v.embed_version = $5
            """,
            *key,
            job["embed_model"],
            job["embed_version"],
        )
        assert vectors <= total, f"job {job_id}: {vectors} vectors for {total} chunks"
        if status in ("embeddings_stored", "complete"):
            assert vectors == total, (
                f"job {job_id} in {status}: {vectors} vectors for {total} chunks"
            )
    if status == "complete":
        report.complete_jobs += 1
        report.searchable_chunks += len(searchable)
        assert len(searchable) == total, (
            f"complete job {job_id}: {len(searchable)} searchable chunks, "
            f"chunks_total {total}"
        )
        assert sorted(row["chunk_ord"] for row in searchable) == list(range(total))
        assert len({row["chunk_id"] for row in searchable}) == total


async def _check_event_chains(connection: asyncpg.Connection) -> int:
    """Replay each job's events: they must form one chain, one lease at a time.

    Each event must start from the status the previous one ended in, so no
    transition is taken twice from the same status. Every event a worker
    writes after its claim must carry that claim's lease token.
    """
    events = await connection.fetch(
        "SELECT * FROM job_events ORDER BY job_id, event_id"
    )
    current: dict[uuid.UUID, str | None] = {}
    leases: dict[uuid.UUID, uuid.UUID | None] = {}
    for event in events:
        job_id = event["job_id"]
        action = (event["detail"] or {}).get("action")
        previous = current.get(job_id)
        assert event["from_status"] == previous, (
            f"job {job_id}: event {event['event_id']} moves from "
            f"{event['from_status']} but the job was in {previous}; two workers "
            "took the same transition"
        )
        if action == "claim":
            leases[job_id] = event["lease_token"]
        elif event["lease_token"] is not None:
            assert event["lease_token"] == leases.get(job_id), (
                f"job {job_id}: event {event['event_id']} ({event['from_status']} → "
                f"{event['to_status']}) was written under lease {event['lease_token']}, "
                f"not the current lease {leases.get(job_id)}"
            )
        if action in ("fail", "retry", "release", "retry_job") or (
            action is None and event["to_status"] in _HAND_OFF
        ):
            leases[job_id] = None
        current[job_id] = event["to_status"]
    for job_id, status in await connection.fetch(
        "SELECT job_id, status FROM upload_jobs"
    ):
        assert current.get(job_id) == status, (
            f"job {job_id} is {status} but its last event ends in {current.get(job_id)}"
        )
    return len(events)


# Statuses a worker's advance hands on with the lease cleared.
_HAND_OFF = {"parse_validated", "chunks_stored", "complete"}
