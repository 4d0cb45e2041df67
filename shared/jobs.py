"""The job state machine and every SQL statement that moves a job.

Statuses, which stage owns each, and the guarded updates live here, so the
rules of the pipeline can be reviewed in one file. Every transition is
guarded by the status the worker expects and by its lease token: an update
that matches no row means the lease was lost, and the caller must drop its
work rather than overwrite someone else's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

# Channel for every job notification. The payload is a small JSON object:
# {"job_id": "...", "status": "..."} for one job, or
# {"job_ids": ["...", ...], "status": "..."} for the jobs that one batched
# hand-off moved to the same status (shared.notify.notified_job_ids reads
# both). The version suffix lets a later payload format use a new channel
# while old and new replicas run side by side.
NOTIFY_CHANNEL = "ingestd_jobs_v1"
# Job ids one notification carries at most: 100 ids of 39 bytes each keep
# the payload well below PostgreSQL's limit of 8,000 bytes.
MAX_NOTIFY_JOB_IDS = 100


class Status(StrEnum):
    """Values of ``upload_jobs.status``, in pipeline order."""

    UPLOADED = "uploaded"
    PARSE_QUEUED = "parse_queued"
    PARSED = "parsed"
    PARSE_VALIDATED = "parse_validated"
    CHUNKING = "chunking"
    CHUNKS_STORED = "chunks_stored"
    EMBEDDING_QUEUED = "embedding_queued"
    EMBEDDING_IN_PROGRESS = "embedding_in_progress"
    EMBEDDINGS_STORED = "embeddings_stored"
    COMPLETE = "complete"
    FAILED_PARSE = "failed_parse"
    FAILED_CHUNKING = "failed_chunking"
    FAILED_EMBEDDING = "failed_embedding"


TERMINAL_STATUSES = frozenset(
    {
        Status.COMPLETE,
        Status.FAILED_PARSE,
        Status.FAILED_CHUNKING,
        Status.FAILED_EMBEDDING,
    }
)

# RetryJob moves a failed job back to the last status that succeeded.
RETRY_TARGETS: Mapping[Status, Status] = {
    Status.FAILED_PARSE: Status.UPLOADED,
    Status.FAILED_CHUNKING: Status.PARSE_VALIDATED,
    Status.FAILED_EMBEDDING: Status.CHUNKS_STORED,
}


@dataclass(frozen=True)
class StageSpec:
    """Statuses one stage claims, and the status each claim moves a job to.

    ``claims`` maps a claimable status to the status the job has while a
    worker has a lease on it. In-flight statuses map to themselves, because
    they are claimable only after their lease expired, when the worker that
    had it died.
    ``releases`` maps an in-flight status to the status a draining worker
    hands the job back in.
    """

    name: str
    claims: Mapping[Status, Status]
    releases: Mapping[Status, Status]
    failed: Status

    @property
    def owned(self) -> frozenset[Status]:
        """Every status a worker of this stage may hold a lease in."""
        return frozenset(self.claims.values()) | frozenset(self.claims.keys())


PARSE_STAGE = StageSpec(
    name="parse",
    claims={
        Status.UPLOADED: Status.PARSE_QUEUED,
        Status.PARSE_QUEUED: Status.PARSE_QUEUED,
        Status.PARSED: Status.PARSED,
    },
    releases={Status.PARSE_QUEUED: Status.UPLOADED, Status.PARSED: Status.PARSED},
    failed=Status.FAILED_PARSE,
)
CHUNK_STAGE = StageSpec(
    name="chunk",
    claims={Status.PARSE_VALIDATED: Status.CHUNKING, Status.CHUNKING: Status.CHUNKING},
    releases={Status.CHUNKING: Status.PARSE_VALIDATED},
    failed=Status.FAILED_CHUNKING,
)
EMBED_STAGE = StageSpec(
    name="embed",
    claims={
        Status.CHUNKS_STORED: Status.EMBEDDING_QUEUED,
        Status.EMBEDDING_QUEUED: Status.EMBEDDING_QUEUED,
        Status.EMBEDDING_IN_PROGRESS: Status.EMBEDDING_IN_PROGRESS,
        Status.EMBEDDINGS_STORED: Status.EMBEDDINGS_STORED,
    },
    releases={
        Status.EMBEDDING_QUEUED: Status.CHUNKS_STORED,
        Status.EMBEDDING_IN_PROGRESS: Status.EMBEDDING_IN_PROGRESS,
        Status.EMBEDDINGS_STORED: Status.EMBEDDINGS_STORED,
    },
    failed=Status.FAILED_EMBEDDING,
)
STAGES: Mapping[str, StageSpec] = {
    spec.name: spec for spec in (PARSE_STAGE, CHUNK_STAGE, EMBED_STAGE)
}


class LeaseLostError(Exception):
    """A guarded update matched no row: another worker owns the job now, or
    the job was deleted. The work in hand must be dropped."""

    def __init__(self, job_id: uuid.UUID, expected: str) -> None:
        super().__init__(
            f"lease on job {job_id} was lost (expected status {expected!r}); "
            "dropping the work in hand"
        )
        self.job_id = job_id
        self.expected = expected


@dataclass
class Lease:
    """A worker's hold on one job, with the status it expects the job in."""

    job_id: uuid.UUID
    token: uuid.UUID
    worker: str
    status: Status
    lost: bool = False


@dataclass
class ClaimedJob:
    """A job row as returned by a claim."""

    job_id: uuid.UUID
    user_id: str
    document_id: uuid.UUID
    status: Status
    claimed_from: Status
    raw_path: str
    parsed_path: str | None
    parsed_sha256: str | None
    chunker_name: str
    chunker_version: str
    embed_model: str
    embed_version: str
    progress: dict[str, int]
    retry_count: int
    attempts: int
    max_attempts: int
    lease_token: uuid.UUID
    parse_password: str | None = field(default=None, repr=False)

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> ClaimedJob:
        return cls(
            job_id=record["job_id"],
            user_id=record["user_id"],
            document_id=record["document_id"],
            status=Status(record["status"]),
            claimed_from=Status(record["claimed_from"]),
            raw_path=record["raw_path"],
            parsed_path=record["parsed_path"],
            parsed_sha256=record["parsed_sha256"],
            chunker_name=record["chunker_name"],
            chunker_version=record["chunker_version"],
            embed_model=record["embed_model"],
            embed_version=record["embed_version"],
            progress=dict(record["progress"]),
            retry_count=record["retry_count"],
            attempts=record["attempts"],
            max_attempts=record["max_attempts"],
            lease_token=record["lease_token"],
            parse_password=record["parse_password"],
        )


# The claim statement. claim_query fills in {statuses} as SQL literals, so
# the planner matches them to the stage's partial index, and {limit}.
CLAIM_SQL = """
WITH candidates AS (
    SELECT job_id, status AS claimed_from
    FROM upload_jobs
    -- Served by the stage's partial index upload_jobs_<stage>_claim_idx on
    -- (run_after, created_at), whose predicate is this status list. The
    -- index returns rows in ORDER BY order, so the scan stops once LIMIT
    -- rows pass the filters below, instead of reading and sorting every
    -- waiting job.
    WHERE status IN ({statuses})
      -- Backoff: a retried job waits until run_after.
      AND run_after <= now()
      -- A job with a live lease belongs to another worker. An expired lease
      -- means its worker died or froze, and the job is up for grabs.
      AND (lease_expires_at IS NULL OR lease_expires_at < now())
      -- A worker takes only jobs stamped with its own chunker or model
      -- version, so replicas of two versions can run side by side.
      AND ($5::text IS NULL OR chunker_version = $5)
      AND ($6::text IS NULL OR embed_version = $6)
    ORDER BY run_after, created_at
    LIMIT {limit}
    -- A row lock held only for this short transaction: other claimers skip
    -- the rows instead of waiting, then the lease keeps them away.
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE upload_jobs AS j
    SET status = t.to_status,
        lease_token = gen_random_uuid(),
        leased_by = $3,
        lease_expires_at = now() + make_interval(secs => $4),
        heartbeat_at = now(),
        -- Counted at claim, so a document that kills its worker every time
        -- still runs out of attempts.
        attempts = j.attempts + 1,
        updated_at = now()
    FROM candidates AS c
    JOIN unnest($1::text[], $2::text[]) AS t(from_status, to_status)
      ON t.from_status = c.claimed_from
    WHERE j.job_id = c.job_id
    RETURNING j.job_id, j.user_id, j.document_id, j.status, c.claimed_from,
        j.raw_path, j.parsed_path, j.parsed_sha256, j.chunker_name,
        j.chunker_version, j.embed_model, j.embed_version, j.progress,
        j.retry_count, j.attempts, j.max_attempts, j.lease_token, j.leased_by,
        j.parse_password
),
events AS (
    INSERT INTO job_events (job_id, from_status, to_status, worker, lease_token, detail)
    SELECT job_id, claimed_from, status, leased_by, lease_token,
           jsonb_build_object('action', 'claim', 'attempt', attempts)
    FROM claimed
)
SELECT * FROM claimed
"""


def claim_query(
    spec: StageSpec,
    *,
    worker: str,
    limit: int,
    lease_seconds: float,
    chunker_version: str | None = None,
    embed_version: str | None = None,
) -> tuple[str, list[Any]]:
    """Build the claim statement for a stage and its arguments, as claim_jobs runs them."""
    sources = [Status(status) for status in spec.claims]
    # Status() raises ValueError for anything but a member of the enum, and
    # no member contains a quote, so the literals cannot carry foreign SQL.
    literals = ", ".join(f"'{status.value}'" for status in sources)
    arguments: list[Any] = [
        [str(status) for status in sources],
        [str(spec.claims[status]) for status in sources],
        worker,
        float(lease_seconds),
        chunker_version,
        embed_version,
    ]
    # With LIMIT as a parameter, the generic plan expects a tenth of the queue
    # and scans the whole table, so every claim was planned anew. With a
    # literal, PostgreSQL can reuse a cheap generic plan.
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(
            f"invalid claim limit {limit!r}: pass a positive integer batch size"
        )
    return CLAIM_SQL.format(statuses=literals, limit=limit), arguments


async def claim_jobs(
    connection: asyncpg.Connection,
    spec: StageSpec,
    *,
    worker: str,
    limit: int,
    lease_seconds: float,
    chunker_version: str | None = None,
    embed_version: str | None = None,
) -> list[ClaimedJob]:
    """Claim up to limit jobs for a stage in one statement.

    chunker_version and embed_version, when given, restrict the claim to
    jobs stamped with that version. Outside a transaction block the
    statement is its own short transaction, which saves the BEGIN and COMMIT
    round trips of an explicit one. Inside the caller's transaction, the row
    locks and the claim last until that transaction ends.
    """
    query, arguments = claim_query(
        spec,
        worker=worker,
        limit=limit,
        lease_seconds=lease_seconds,
        chunker_version=chunker_version,
        embed_version=embed_version,
    )
    rows = await connection.fetch(query, *arguments)
    return [ClaimedJob.from_record(row) for row in rows]


async def notify(
    connection: asyncpg.Connection, job_id: uuid.UUID, status: str
) -> None:
    """Queue a notification; PostgreSQL delivers it when the transaction commits."""
    payload = json.dumps({"job_id": str(job_id), "status": status})
    await connection.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload)


async def record_event(
    connection: asyncpg.Connection,
    job_id: uuid.UUID,
    from_status: str | None,
    to_status: str,
    *,
    worker: str | None,
    lease_token: uuid.UUID | None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Append one row to the job_events audit trail."""
    await connection.execute(
        """
        INSERT INTO job_events (job_id, from_status, to_status, worker, lease_token, detail)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        job_id,
        from_status,
        to_status,
        worker,
        lease_token,
        dict(detail or {}),
    )


# Columns that a guarded transition may set besides status. Names are fixed
# here, so callers cannot inject SQL through them.
_SETTABLE_COLUMNS = frozenset(
    {
        "parsed_path",
        "parsed_sha256",
        "progress",
        "last_error",
        "parse_password",
        "retry_count",
    }
)


# One statement moves a job: the guarded UPDATE, its job_events row (only
# when the status changes) and the notification, so a transition costs one
# round trip. {assignments} comes from advance or update_progress, built
# only from fixed column names. A CTE that only SELECTs runs only when
# referenced, so the final SELECT joins "notified" to make pg_notify run.
_TRANSITION_SQL = """
WITH moved AS (
    UPDATE upload_jobs SET {assignments}
    WHERE job_id = $1 AND status = $2 AND lease_token = $3
    RETURNING *
),
event AS (
    INSERT INTO job_events (job_id, from_status, to_status, worker, lease_token, detail)
    SELECT job_id, $2, $4, $5, $3, $6::jsonb FROM moved WHERE $4 <> $2
),
notified AS (
    SELECT pg_notify('{channel}', json_build_object('job_id', job_id, 'status', $4)::text)
    FROM moved
)
SELECT moved.* FROM moved, notified
"""


async def _transition(
    connection: asyncpg.Connection,
    lease: Lease,
    to_status: Status,
    assignments: list[str],
    extra_values: list[Any],
    detail: Mapping[str, Any] | None,
) -> asyncpg.Record:
    query = _TRANSITION_SQL.format(
        assignments=", ".join(assignments), channel=NOTIFY_CHANNEL
    )
    row = await connection.fetchrow(
        query,
        lease.job_id,
        str(lease.status),
        lease.token,
        str(to_status),
        lease.worker,
        dict(detail or {}),
        *extra_values,
    )
    if row is None:
        raise LeaseLostError(lease.job_id, str(lease.status))
    lease.status = to_status
    return row


# Parameters $1 to $6 of _TRANSITION_SQL; a transition's own values follow.
_FIRST_EXTRA_PARAMETER = 7


async def advance(
    connection: asyncpg.Connection,
    lease: Lease,
    to_status: Status,
    *,
    keep_lease: bool = True,
    set_columns: Mapping[str, Any] | None = None,
    detail: Mapping[str, Any] | None = None,
) -> asyncpg.Record:
    """Move a leased job to to_status, guarded by status and lease token.

    Must run inside the caller's transaction, together with the durable
    write that justifies the move. With keep_lease false the lease is
    cleared, so the next stage can claim the job at once. The job_events
    row (when the status changes) and the notification are written by the
    same statement. Raises LeaseLostError when the guard matches no row.
    """
    columns = dict(set_columns or {})
    unknown = set(columns) - _SETTABLE_COLUMNS
    if unknown:
        raise ValueError(f"columns {sorted(unknown)} cannot be set by a transition")
    assignments = ["status = $4", "updated_at = now()"]
    values: list[Any] = []
    for name, value in columns.items():
        values.append(value)
        assignments.append(f"{name} = ${_FIRST_EXTRA_PARAMETER + len(values) - 1}")
    if not keep_lease:
        # Handing the job to the next stage: the lease ends, and the claim
        # and retry counts start afresh, because they limit each stage.
        assignments += [
            "attempts = 0",
            "retry_count = 0",
            "lease_token = NULL",
            "leased_by = NULL",
            "lease_expires_at = NULL",
            "heartbeat_at = NULL",
        ]
    return await _transition(connection, lease, to_status, assignments, values, detail)


@dataclass(frozen=True)
class HandOff:
    """One leased job to move to to_status and release to the next stage."""

    job_id: uuid.UUID
    lease_token: uuid.UUID
    from_status: Status
    to_status: Status
    detail: Mapping[str, Any] = field(default_factory=dict)


# Hands off many jobs in one statement, with the guard of advance for each
# row: a row whose lease token or status no longer matches is skipped, and
# only the rows moved get a job_events row and are named in a notification.
# One notification per target status lists the moved job ids, because
# WatchJob streams filter notifications by job id. The cross join with the
# one-row count makes the "notified" CTE run, since a CTE that only SELECTs
# runs only when referenced.
_HAND_OFF_SQL = """
WITH requested AS (
    SELECT *
    FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[])
        AS r(job_id, lease_token, from_status, to_status, detail)
),
moved AS (
    UPDATE upload_jobs AS j
    SET status = r.to_status,
        updated_at = now(),
        attempts = 0,
        retry_count = 0,
        lease_token = NULL,
        leased_by = NULL,
        lease_expires_at = NULL,
        heartbeat_at = NULL
    FROM requested AS r
    WHERE j.job_id = r.job_id
      AND j.lease_token = r.lease_token
      AND j.status = r.from_status
    RETURNING r.job_id, r.lease_token, r.from_status, r.to_status, r.detail
),
events AS (
    INSERT INTO job_events (job_id, from_status, to_status, worker, lease_token, detail)
    SELECT job_id, from_status, to_status, $6, lease_token, detail
    FROM moved
    WHERE to_status <> from_status
),
notified AS (
    SELECT pg_notify(
        '{channel}',
        json_build_object('job_ids', json_agg(job_id), 'status', to_status)::text
    )
    FROM moved
    GROUP BY to_status
)
SELECT moved.job_id
FROM moved CROSS JOIN (SELECT count(*) FROM notified) AS sent
"""


async def hand_off_jobs(
    connection: asyncpg.Connection, worker: str, hand_offs: Sequence[HandOff]
) -> set[uuid.UUID]:
    """Move many leased jobs to their next status and clear their leases, in one statement.

    Each job gets what advance(keep_lease=False) gives it: the guarded
    update, a job_events row when the status changes, and a notification,
    here one per target status that lists the moved jobs. Jobs whose lease
    is gone are skipped without affecting the others. Returns the ids of the
    jobs that moved. Run outside a transaction, the statement commits on its
    own, so the moves are durable when it returns. Raises ValueError for
    more than MAX_NOTIFY_JOB_IDS hand-offs.
    """
    if not hand_offs:
        return set()
    if len(hand_offs) > MAX_NOTIFY_JOB_IDS:
        raise ValueError(
            f"{len(hand_offs)} hand-offs in one statement; at most "
            f"{MAX_NOTIFY_JOB_IDS} fit in one notification, so split the batch"
        )
    rows = await connection.fetch(
        _HAND_OFF_SQL.format(channel=NOTIFY_CHANNEL),
        [hand_off.job_id for hand_off in hand_offs],
        [hand_off.lease_token for hand_off in hand_offs],
        [str(hand_off.from_status) for hand_off in hand_offs],
        [str(hand_off.to_status) for hand_off in hand_offs],
        [dict(hand_off.detail) for hand_off in hand_offs],
        worker,
    )
    return {row["job_id"] for row in rows}


async def update_progress(
    connection: asyncpg.Connection,
    lease: Lease,
    to_status: Status,
    progress: Mapping[str, int],
) -> asyncpg.Record:
    """Merge counters into the job's progress while moving it to to_status."""
    assignments = [
        "status = $4",
        f"progress = progress || ${_FIRST_EXTRA_PARAMETER}::jsonb",
        "updated_at = now()",
    ]
    return await _transition(
        connection,
        lease,
        to_status,
        assignments,
        [dict(progress)],
        {"progress": dict(progress)},
    )


async def renew_lease(
    connection: asyncpg.Connection, lease: Lease, lease_seconds: float
) -> datetime | None:
    """Extend the lease; return the new expiry, or None when it was lost."""
    return await connection.fetchval(
        """
        UPDATE upload_jobs
        SET lease_expires_at = now() + make_interval(secs => $3), heartbeat_at = now()
        WHERE job_id = $1 AND lease_token = $2
        RETURNING lease_expires_at
        """,
        lease.job_id,
        lease.token,
        float(lease_seconds),
    )


async def _lock_leased_status(
    connection: asyncpg.Connection, lease: Lease
) -> Status | None:
    """Lock the job row while the lease holds; return its status, or None if lost.

    advance and update_progress set lease.status before the caller's
    transaction commits. When that commit fails, the row keeps the old
    status, so fail, schedule_retry and release start from what the row
    holds, not from lease.status.
    """
    status = await connection.fetchval(
        "SELECT status FROM upload_jobs WHERE job_id = $1 AND lease_token = $2 FOR UPDATE",
        lease.job_id,
        lease.token,
    )
    if status is None:
        return None
    lease.status = Status(status)
    return lease.status


def error_payload(
    code: str, message: str, stage: str, retry_count: int
) -> dict[str, Any]:
    """Build the last_error object; `at` is filled in by the database."""
    return {
        "code": code,
        "message": message,
        "stage": stage,
        "retry_count": retry_count,
    }


async def fail(
    connection: asyncpg.Connection,
    lease: Lease,
    spec: StageSpec,
    *,
    code: str,
    message: str,
    retry_count: int,
) -> bool:
    """Move a leased job to its stage's failed status. False if the lease was lost."""
    error = error_payload(code, message, spec.name, retry_count)
    async with connection.transaction():
        if await _lock_leased_status(connection, lease) is None:
            return False
        row = await connection.fetchrow(
            """
            UPDATE upload_jobs
            SET status = $4,
                last_error = $5::jsonb || jsonb_build_object('at', now()),
                parse_password = NULL,
                lease_token = NULL, leased_by = NULL,
                lease_expires_at = NULL, heartbeat_at = NULL,
                updated_at = now()
            WHERE job_id = $1 AND lease_token = $2 AND status = ANY($3::text[])
            RETURNING status
            """,
            lease.job_id,
            lease.token,
            [str(status) for status in spec.owned],
            str(spec.failed),
            error,
        )
        if row is None:
            return False
        await record_event(
            connection,
            lease.job_id,
            str(lease.status),
            str(spec.failed),
            worker=lease.worker,
            lease_token=lease.token,
            detail={"action": "fail", "code": code},
        )
        await notify(connection, lease.job_id, str(spec.failed))
    lease.status = spec.failed
    return True


async def schedule_retry(
    connection: asyncpg.Connection,
    lease: Lease,
    spec: StageSpec,
    *,
    code: str,
    message: str,
    retry_count: int,
    delay_seconds: float,
) -> bool:
    """Hand a leased job back for a retry after delay_seconds.

    The job returns to the claimable status of its in-flight status, with
    retry_count incremented. False if the lease was lost.
    """
    error = error_payload(code, message, spec.name, retry_count)
    async with connection.transaction():
        current = await _lock_leased_status(connection, lease)
        if current is None:
            return False
        to_status = spec.releases.get(current, current)
        row = await connection.fetchrow(
            """
            UPDATE upload_jobs
            SET status = $3,
                retry_count = retry_count + 1,
                run_after = now() + make_interval(secs => $4),
                last_error = $5::jsonb || jsonb_build_object('at', now()),
                lease_token = NULL, leased_by = NULL,
                lease_expires_at = NULL, heartbeat_at = NULL,
                updated_at = now()
            WHERE job_id = $1 AND lease_token = $2
            RETURNING status
            """,
            lease.job_id,
            lease.token,
            str(to_status),
            float(delay_seconds),
            error,
        )
        if row is None:
            return False
        await record_event(
            connection,
            lease.job_id,
            str(lease.status),
            str(to_status),
            worker=lease.worker,
            lease_token=lease.token,
            detail={"action": "retry", "code": code, "delay_seconds": delay_seconds},
        )
    lease.status = to_status
    return True


async def release(
    connection: asyncpg.Connection, lease: Lease, spec: StageSpec
) -> bool:
    """Give a job back unfinished: claimable status, lease cleared, attempt returned.

    Used by a draining worker whose job did not finish within the grace
    period. False if the lease was already lost.
    """
    async with connection.transaction():
        current = await _lock_leased_status(connection, lease)
        if current is None:
            return False
        to_status = spec.releases.get(current, current)
        row = await connection.fetchrow(
            """
            UPDATE upload_jobs
            SET status = $3,
                attempts = GREATEST(attempts - 1, 0),
                lease_token = NULL, leased_by = NULL,
                lease_expires_at = NULL, heartbeat_at = NULL,
                updated_at = now()
            WHERE job_id = $1 AND lease_token = $2
            RETURNING status
            """,
            lease.job_id,
            lease.token,
            str(to_status),
        )
        if row is None:
            return False
        await record_event(
            connection,
            lease.job_id,
            str(lease.status),
            str(to_status),
            worker=lease.worker,
            lease_token=lease.token,
            detail={"action": "release"},
        )
        await notify(connection, lease.job_id, str(to_status))
    lease.status = to_status
    return True


async def queue_depth(connection: asyncpg.Connection, spec: StageSpec) -> int:
    """Count jobs waiting for a stage, whatever their run_after."""
    waiting = [
        str(status) for status, target in spec.claims.items() if status != target
    ]
    return await connection.fetchval(
        "SELECT count(*) FROM upload_jobs WHERE status = ANY($1::text[])", waiting
    )
