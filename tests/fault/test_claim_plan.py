"""Plans of the claim statement over a large backlog of finished jobs.

The module builds one database with 200,000 finished jobs and 10,000
waiting jobs for each stage. It runs EXPLAIN (ANALYZE, BUFFERS) on the
claim statement of every stage at batch sizes 10 and 100. Then it completes
90% of the waiting jobs and measures again. Each EXPLAIN runs inside a
transaction that is rolled back, and the tests check the collected plans.

Every claim is measured twice: as claim_jobs sends it, which PostgreSQL
plans with the argument values, and as a generic plan of a prepared
statement. A worker runs the same statement on the same pooled connection
many times, and PostgreSQL may switch such a statement to its generic plan
after five runs.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from shared import jobs
from shared.db import connect
from shared.jobs import StageSpec, Status
from tests.conftest import TEMPLATE_DB, _with_database

pytestmark = pytest.mark.fault

FINISHED_JOBS = 200_000
WAITING_JOBS = 10_000
FEWER_WAITING_JOBS = 1_000
BATCH_SIZES = (10, 100)
CHUNKER_VERSION = "plan-chunker"
EMBED_VERSION = "plan-embed"
TERMINAL = [
    str(Status.COMPLETE),
    str(Status.FAILED_PARSE),
    str(Status.FAILED_CHUNKING),
    str(Status.FAILED_EMBEDDING),
]
STAGES = (jobs.PARSE_STAGE, jobs.CHUNK_STAGE, jobs.EMBED_STAGE)
# The status a job waits in before each stage claims it.
QUEUE_STATUS = {
    "parse": Status.UPLOADED,
    "chunk": Status.PARSE_VALIDATED,
    "embed": Status.CHUNKS_STORED,
}
# The versions each stage's worker passes to claim_jobs: the parse worker
# none, the chunk worker its chunker version, the embed worker its model
# version.
STAGE_VERSIONS: dict[str, dict[str, str]] = {
    "parse": {},
    "chunk": {"chunker_version": CHUNKER_VERSION},
    "embed": {"embed_version": EMBED_VERSION},
}
# Shared buffers the candidate scan may touch: a fixed part for the index
# descent, and a part per claimed job for its index entry, its heap page and
# its row lock.
FIXED_BUFFERS = 20
BUFFERS_PER_JOB = 4
# Two claims of one batch size, one with 10 times as many waiting jobs as
# the other, may differ in buffers by this factor plus BACKLOG_BUFFER_SLACK.
# The difference comes from where the claimed rows sit in the heap. A claim
# that reads the whole queue differs by about the factor 10 instead.
BACKLOG_BUFFER_FACTOR = 1.5
BACKLOG_BUFFER_SLACK = 10
PLAN_MODES = ("custom", "generic")

# Every 23rd job waits for the parse stage, the next one for the chunk
# stage and the one after for the embed stage. The other 20 of each 23 are
# finished. Waiting jobs are spread over the whole table and over time,
# as in a queue that has run for a while.
BACKLOG_SQL = """
WITH backlog AS (
    SELECT g,
           gen_random_uuid() AS document_id,
           gen_random_uuid() AS job_id,
           now() - make_interval(secs => $1::int - g) AS created_at,
           CASE g % 23
               WHEN 0 THEN $2::text
               WHEN 1 THEN $3::text
               WHEN 2 THEN $4::text
               ELSE ($5::text[])[1 + g % 4]
           END AS status
    FROM generate_series(1, $1::int) AS g
),
documents AS (
    INSERT INTO documents (document_id, user_id, filename, content_type, byte_size,
        raw_sha256, raw_path)
    SELECT document_id, 'planner', 'plan.txt', 'text/plain', 1, md5(g::text),
           'raw/planner/' || document_id
    FROM backlog
)
INSERT INTO upload_jobs (job_id, user_id, document_id, status, raw_path,
    chunker_name, chunker_version, embed_model, embed_version,
    run_after, created_at, updated_at)
SELECT job_id, 'planner', document_id, status, 'raw/planner/' || document_id,
       'markdown-splitter', $6, 'all-MiniLM-L6-v2', $7,
       created_at, created_at, created_at
FROM backlog
"""

# Completes all but every tenth waiting job of each queue, oldest first.
SHRINK_SQL = """
WITH ranked AS (
    SELECT job_id,
           row_number() OVER (PARTITION BY status ORDER BY created_at) AS position
    FROM upload_jobs
    WHERE status = ANY($1::text[])
)
UPDATE upload_jobs AS j
SET status = 'complete', updated_at = now()
FROM ranked AS r
WHERE j.job_id = r.job_id AND r.position % $2::int <> 0
"""


@dataclass(frozen=True)
class ClaimPlan:
    """One EXPLAIN (ANALYZE, BUFFERS) of a claim, with the figures the tests use."""

    stage: str
    waiting: int
    batch: int
    mode: str
    plan: dict[str, Any]

    @property
    def candidates(self) -> dict[str, Any]:
        """The plan node of the candidates CTE, which finds and locks the jobs."""
        for node in walk(self.plan["Plan"]):
            if node.get("Subplan Name") == "CTE candidates":
                return node
        raise AssertionError(f"no CTE candidates node in {self}")

    @property
    def candidate_buffers(self) -> int:
        return shared_buffers(self.candidates)

    @property
    def statement_buffers(self) -> int:
        return shared_buffers(self.plan["Plan"])

    def job_scans(self) -> list[dict[str, Any]]:
        """Scan nodes of the candidates CTE that read upload_jobs."""
        return [
            node
            for node in walk(self.candidates)
            if node.get("Relation Name") == "upload_jobs"
        ]

    def node_types(self) -> list[str]:
        return [node["Node Type"] for node in walk(self.candidates)]

    def describe(self) -> str:
        scans = ", ".join(
            f"{node['Node Type']} {node.get('Index Name', '')}".strip()
            for node in self.job_scans()
        )
        return (
            f"{self.stage} claim of {self.batch} with {self.waiting} waiting, "
            f"{self.mode} plan: "
            f"nodes {self.node_types()}, scans [{scans}], "
            f"{self.candidate_buffers} candidate buffers, "
            f"{self.statement_buffers} statement buffers"
        )


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield node and every node below it in an EXPLAIN JSON plan."""
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)


def shared_buffers(node: dict[str, Any]) -> int:
    """Shared buffers a node and its children touched: hits plus reads."""
    return node["Shared Hit Blocks"] + node["Shared Read Blocks"]


def sql_literal(value: Any) -> str:
    """Write a test argument of the claim as an SQL literal."""
    if value is None:
        return "NULL"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return f"ARRAY[{', '.join(sql_literal(item) for item in value)}]::text[]"
    text = str(value).replace("'", "''")
    return f"'{text}'"


async def explain_claim(
    connection: asyncpg.Connection, spec: StageSpec, batch: int, mode: str
) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) the claim of one stage, then roll it back.

    In mode "custom" the statement runs with bound arguments, exactly as
    claim_jobs sends it. In mode "generic" it runs as a prepared statement
    under plan_cache_mode = force_generic_plan, so the plan cannot depend on
    the argument values.
    """
    query, arguments = jobs.claim_query(
        spec,
        worker="plan-test",
        limit=batch,
        lease_seconds=30,
        **STAGE_VERSIONS[spec.name],
    )
    explain = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)"
    transaction = connection.transaction()
    await transaction.start()
    try:
        if mode == "custom":
            output = await connection.fetchval(f"{explain} {query}", *arguments)
        else:
            await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await connection.execute(f"PREPARE generic_claim AS {query}")
            values = ", ".join(sql_literal(value) for value in arguments)
            output = await connection.fetchval(
                f"{explain} EXECUTE generic_claim({values})"
            )
    finally:
        await transaction.rollback()
        if mode == "generic":
            # A prepared statement outlives the transaction that made it.
            await connection.execute("DEALLOCATE generic_claim")
    return json.loads(output)[0]


async def measure(
    connection: asyncpg.Connection, waiting: int
) -> dict[tuple[str, int, int, str], ClaimPlan]:
    plans = {}
    for spec in STAGES:
        for batch in BATCH_SIZES:
            for mode in PLAN_MODES:
                # The rolled-back claims before this one left dead row
                # versions behind. VACUUM removes them, so each plan starts
                # from the same table.
                await connection.execute("VACUUM upload_jobs")
                plan = await explain_claim(connection, spec, batch, mode)
                plans[spec.name, waiting, batch, mode] = ClaimPlan(
                    spec.name, waiting, batch, mode, plan
                )
    return plans


async def queue_sizes(connection: asyncpg.Connection) -> dict[str, int]:
    rows = await connection.fetch(
        "SELECT status, count(*) AS jobs FROM upload_jobs GROUP BY status"
    )
    return {row["status"]: row["jobs"] for row in rows}


@pytest.fixture(scope="module")
async def claim_plans(
    postgres_url: str, template_url: str
) -> AsyncIterator[dict[tuple[str, int, int, str], ClaimPlan]]:
    """Claim plans by (stage, waiting jobs, batch size, plan mode), from one backlog."""
    name = f"plan_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    finally:
        await admin.close()
    connection = await connect(_with_database(postgres_url, name))
    try:
        queues = [str(QUEUE_STATUS[spec.name]) for spec in STAGES]
        total = FINISHED_JOBS + WAITING_JOBS * len(STAGES)
        await connection.execute(
            BACKLOG_SQL, total, *queues, TERMINAL, CHUNKER_VERSION, EMBED_VERSION
        )
        await connection.execute("VACUUM (ANALYZE) upload_jobs")
        sizes = await queue_sizes(connection)
        assert [sizes[queue] for queue in queues] == [WAITING_JOBS] * len(STAGES)
        assert sum(sizes[status] for status in TERMINAL) == FINISHED_JOBS
        plans = await measure(connection, WAITING_JOBS)

        await connection.execute(SHRINK_SQL, queues, WAITING_JOBS // FEWER_WAITING_JOBS)
        await connection.execute("VACUUM (ANALYZE) upload_jobs")
        sizes = await queue_sizes(connection)
        assert [sizes[queue] for queue in queues] == [FEWER_WAITING_JOBS] * len(STAGES)
        plans |= await measure(connection, FEWER_WAITING_JOBS)
        yield plans
    finally:
        await connection.close()
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.mark.parametrize("mode", PLAN_MODES)
@pytest.mark.parametrize("stage", [spec.name for spec in STAGES])
async def test_claim_reads_stage_index(
    claim_plans: dict[tuple[str, int, int, str], ClaimPlan], stage: str, mode: str
) -> None:
    for waiting in (WAITING_JOBS, FEWER_WAITING_JOBS):
        for batch in BATCH_SIZES:
            plan = claim_plans[stage, waiting, batch, mode]
            scans = plan.job_scans()
            assert len(scans) == 1, plan.describe()
            assert scans[0]["Node Type"] == "Index Scan", plan.describe()
            assert scans[0]["Index Name"] == f"upload_jobs_{stage}_claim_idx", (
                plan.describe()
            )
            assert "Sort" not in plan.node_types(), plan.describe()
            assert "Incremental Sort" not in plan.node_types(), plan.describe()
            # The scan stops at the batch size instead of reading the queue.
            assert scans[0]["Actual Rows"] == batch, plan.describe()
            assert scans[0].get("Rows Removed by Filter", 0) == 0, plan.describe()
            assert plan.plan["Plan"]["Actual Rows"] == batch, plan.describe()


@pytest.mark.parametrize("mode", PLAN_MODES)
@pytest.mark.parametrize("stage", [spec.name for spec in STAGES])
async def test_claim_buffers_ignore_backlog(
    claim_plans: dict[tuple[str, int, int, str], ClaimPlan], stage: str, mode: str
) -> None:
    for batch in BATCH_SIZES:
        long_queue = claim_plans[stage, WAITING_JOBS, batch, mode]
        short_queue = claim_plans[stage, FEWER_WAITING_JOBS, batch, mode]
        report = f"{long_queue.describe()}; {short_queue.describe()}"
        for buffers in ("candidate_buffers", "statement_buffers"):
            long_buffers = getattr(long_queue, buffers)
            short_buffers = getattr(short_queue, buffers)
            low, high = sorted((long_buffers, short_buffers))
            assert high <= BACKLOG_BUFFER_FACTOR * low + BACKLOG_BUFFER_SLACK, report


@pytest.mark.parametrize("mode", PLAN_MODES)
@pytest.mark.parametrize("stage", [spec.name for spec in STAGES])
async def test_claim_buffers_follow_batch(
    claim_plans: dict[tuple[str, int, int, str], ClaimPlan], stage: str, mode: str
) -> None:
    for waiting in (WAITING_JOBS, FEWER_WAITING_JOBS):
        small, large = (
            claim_plans[stage, waiting, batch, mode] for batch in BATCH_SIZES
        )
        report = f"{small.describe()}; {large.describe()}"
        for plan in (small, large):
            limit = FIXED_BUFFERS + BUFFERS_PER_JOB * plan.batch
            assert plan.candidate_buffers <= limit, report
        assert large.candidate_buffers > small.candidate_buffers, report
        assert large.statement_buffers > small.statement_buffers, report


async def test_stage_index_predicates_match(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            """
            SELECT c.relname AS name,
                   pg_get_expr(i.indpred, i.indrelid) AS predicate,
                   pg_get_indexdef(i.indexrelid) AS definition
            FROM pg_index AS i
            JOIN pg_class AS c ON c.oid = i.indexrelid
            WHERE i.indrelid = 'upload_jobs'::regclass
            """
        )
    finally:
        await connection.close()
    indexes = {row["name"]: row for row in rows}
    assert "upload_jobs_claim_idx" not in indexes
    for spec in STAGES:
        index = indexes[f"upload_jobs_{spec.name}_claim_idx"]
        assert "(run_after, created_at)" in index["definition"]
        # PostgreSQL prints an IN list as = ANY (ARRAY['a'::text, ...]).
        listed = set(re.findall(r"'([a-z_]+)'::text", index["predicate"]))
        assert listed == {str(status) for status in spec.claims}, index["predicate"]
