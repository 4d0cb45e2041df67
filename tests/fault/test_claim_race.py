"""Many claimers driving many jobs through every stage at once.

1,000 jobs start in ``uploaded``. 32 claimers, each on its own connection,
claim batches of 10 from all three stages in turn and move each claimed job
along the status path of that stage's real worker, with the guarded
transitions of shared.jobs. The claim results and the job_events audit
trail must both show each job claimed once per stage and moved once from
each status.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import pytest

from shared import jobs
from shared.db import connect
from shared.jobs import Lease, LeaseLostError, StageSpec, Status

pytestmark = pytest.mark.fault

JOBS = 1_000
CLAIMERS = 32
BATCH = 10
LEASE_SECONDS = 300
CHUNKER_VERSION = "race-chunker"
EMBED_VERSION = "race-embed"
# Guards against a hang only: the run takes a few seconds.
RUN_LIMIT_SECONDS = 300

# For each stage: the status a job waits in, the status the claim moves it
# to, then each status the worker advances it to. The last step clears the
# lease, which hands the job to the next stage.
STAGE_PATHS: dict[str, tuple[Status, ...]] = {
    "parse": (
        Status.UPLOADED,
        Status.PARSE_QUEUED,
        Status.PARSED,
        Status.PARSE_VALIDATED,
    ),
    "chunk": (Status.PARSE_VALIDATED, Status.CHUNKING, Status.CHUNKS_STORED),
    "embed": (
        Status.CHUNKS_STORED,
        Status.EMBEDDING_QUEUED,
        Status.EMBEDDING_IN_PROGRESS,
        Status.EMBEDDINGS_STORED,
        Status.COMPLETE,
    ),
}
STAGES = (jobs.PARSE_STAGE, jobs.CHUNK_STAGE, jobs.EMBED_STAGE)
# The versions each stage's worker passes to claim_jobs.
STAGE_VERSIONS: dict[str, dict[str, str]] = {
    "parse": {},
    "chunk": {"chunker_version": CHUNKER_VERSION},
    "embed": {"embed_version": EMBED_VERSION},
}
# Every event of one job, in order, as (from_status, to_status).
EXPECTED_EVENTS = [
    (str(path[step]), str(path[step + 1]))
    for path in STAGE_PATHS.values()
    for step in range(len(path) - 1)
]

INSERT_JOBS_SQL = """
WITH numbered AS (
    SELECT g, gen_random_uuid() AS document_id, gen_random_uuid() AS job_id
    FROM generate_series(1, $1::int) AS g
),
documents AS (
    INSERT INTO documents (document_id, user_id, filename, content_type, byte_size,
        raw_sha256, raw_path)
    SELECT document_id, 'racer', 'race.txt', 'text/plain', 1, md5(g::text),
           'raw/racer/' || document_id
    FROM numbered
)
INSERT INTO upload_jobs (job_id, user_id, document_id, status, raw_path,
    chunker_name, chunker_version, embed_model, embed_version, created_at)
SELECT job_id, 'racer', document_id, 'uploaded', 'raw/racer/' || document_id,
       'markdown-splitter', $2, 'all-MiniLM-L6-v2', $3,
       now() - make_interval(secs => $1::int - g)
FROM numbered
"""


@dataclass(frozen=True)
class Claim:
    """One job as one claim returned it."""

    stage: str
    job_id: uuid.UUID
    claimed_from: Status
    status: Status
    worker: str
    lease_token: uuid.UUID


@dataclass
class Race:
    """State shared by the claimers of one run."""

    claims: list[Claim] = field(default_factory=list)
    lost_leases: list[tuple[str, uuid.UUID, str]] = field(default_factory=list)
    in_hand: int = 0


async def move_job(
    connection: asyncpg.Connection, spec: StageSpec, lease: Lease
) -> None:
    """Advance a leased job along its stage's path, one transaction per step."""
    path = STAGE_PATHS[spec.name]
    for to_status in path[2:]:
        last = to_status == path[-1]
        async with connection.transaction():
            await jobs.advance(connection, lease, to_status, keep_lease=not last)


async def claimer(database_url: str, name: str, offset: int, race: Race) -> None:
    """Claim from every stage in turn until no claimer has work left."""
    connection = await connect(database_url)
    order = STAGES[offset % len(STAGES) :] + STAGES[: offset % len(STAGES)]
    try:
        while True:
            claimed_any = False
            for spec in order:
                claimed = await jobs.claim_jobs(
                    connection,
                    spec,
                    worker=name,
                    limit=BATCH,
                    lease_seconds=LEASE_SECONDS,
                    **STAGE_VERSIONS[spec.name],
                )
                race.in_hand += len(claimed)
                claimed_any = claimed_any or bool(claimed)
                for job in claimed:
                    race.claims.append(
                        Claim(
                            spec.name,
                            job.job_id,
                            job.claimed_from,
                            job.status,
                            name,
                            job.lease_token,
                        )
                    )
                    lease = Lease(job.job_id, job.lease_token, name, job.status)
                    try:
                        await move_job(connection, spec, lease)
                    except LeaseLostError:
                        # Another claimer took the job too. The asserts
                        # report it, so the run goes on.
                        race.lost_leases.append((spec.name, job.job_id, name))
                    finally:
                        race.in_hand -= 1
            # A claimer stops after a round that found nothing while no
            # other claimer held a job. A claimer that moved a job always
            # runs another round, so the last job moved is still picked up
            # by its next stage.
            if not claimed_any and race.in_hand == 0:
                return
            if not claimed_any:
                await asyncio.sleep(0.01)
    finally:
        await connection.close()


async def test_claim_race_all_stages(database_url: str) -> None:
    connection = await connect(database_url)
    try:
        await connection.execute(INSERT_JOBS_SQL, JOBS, CHUNKER_VERSION, EMBED_VERSION)
        job_ids = {
            row["job_id"]
            for row in await connection.fetch("SELECT job_id FROM upload_jobs")
        }
        assert len(job_ids) == JOBS

        race = Race()
        async with asyncio.timeout(RUN_LIMIT_SECONDS), asyncio.TaskGroup() as group:
            for number in range(CLAIMERS):
                group.create_task(
                    claimer(database_url, f"claimer-{number}", number, race)
                )

        statuses = await connection.fetch(
            "SELECT status, count(*) AS jobs FROM upload_jobs GROUP BY status"
        )
        events = await connection.fetch(
            """
            SELECT job_id, from_status, to_status, worker, lease_token,
                   detail->>'action' AS action
            FROM job_events
            ORDER BY job_id, event_id
            """
        )
        repeated = await connection.fetch(
            """
            SELECT job_id, from_status, count(*) AS moves
            FROM job_events
            GROUP BY job_id, from_status
            HAVING count(*) > 1
            """
        )
    finally:
        await connection.close()

    # What the claimers saw.
    assert {row["status"]: row["jobs"] for row in statuses} == {"complete": JOBS}
    assert race.lost_leases == []
    for spec in STAGES:
        path = STAGE_PATHS[spec.name]
        stage_claims = [claim for claim in race.claims if claim.stage == spec.name]
        per_job = Counter(claim.job_id for claim in stage_claims)
        assert set(per_job) == job_ids, spec.name
        assert max(per_job.values()) == 1, spec.name
        assert {claim.claimed_from for claim in stage_claims} == {path[0]}, spec.name
        assert {claim.status for claim in stage_claims} == {path[1]}, spec.name
        assert len({claim.lease_token for claim in stage_claims}) == JOBS, spec.name
    claimers_used = {claim.worker for claim in race.claims}
    assert len(claimers_used) > 1

    # What the audit trail recorded.
    assert repeated == []
    trails: dict[uuid.UUID, list[asyncpg.Record]] = {}
    for event in events:
        trails.setdefault(event["job_id"], []).append(event)
    assert set(trails) == job_ids
    claims_by_key = {(claim.stage, claim.job_id): claim for claim in race.claims}
    for job_id, trail in trails.items():
        moves = [(event["from_status"], event["to_status"]) for event in trail]
        assert moves == EXPECTED_EVENTS, job_id
        position = 0
        for spec in STAGES:
            steps = len(STAGE_PATHS[spec.name]) - 1
            stage_events = trail[position : position + steps]
            position += steps
            claim = claims_by_key[spec.name, job_id]
            # The first event of a stage is its claim, and every later event
            # of that stage was written under the same lease by the same
            # claimer.
            assert stage_events[0]["action"] == "claim", (job_id, spec.name)
            assert all(event["action"] != "claim" for event in stage_events[1:]), (
                job_id,
                spec.name,
            )
            assert {event["lease_token"] for event in stage_events} == {
                claim.lease_token
            }, (job_id, spec.name)
            assert {event["worker"] for event in stage_events} == {claim.worker}, (
                job_id,
                spec.name,
            )
