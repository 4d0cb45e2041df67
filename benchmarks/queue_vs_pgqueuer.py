"""Queue overhead: no-op jobs through BaseWorker against pgqueuer on one PostgreSQL.

Each system drains the same number of no-op jobs with 1 and then 4 worker
processes, each process with its own connections. An ingestd job is
claimed by BaseWorker's claim statement and moved on by one of two paths:

- ``ingestd`` hands it off with ``BaseWorker.hand_off``, which commits the
  guarded moves of many jobs (job rows, job_events rows, notifications)
  with one statement per flush;
- ``ingestd-transaction`` runs the guarded ``jobs.advance`` in a
  transaction of its own per job, as a stage with output writes does.

A pgqueuer job is dequeued by ``QueueManager`` and handed to an entrypoint
that returns at once. A job counts as done when its handler returns: for
ingestd that is after the commit of its move, for pgqueuer before its
completion is flushed, which pgqueuer buffers per batch. Both databases
are analyzed after the jobs are inserted.

The runs repeat in rounds (``--rounds``), and each reported ratio is the
median of the per-round ratios, because one run lasts about a second and
the load of a shared machine changes from run to run.

Run: ``python -m benchmarks.queue_vs_pgqueuer`` (``--smoke`` for the small
CI size).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import time
from datetime import timedelta
from typing import Any

import asyncpg

from benchmarks import harness
from shared import jobs
from shared.config import Settings
from shared.db import create_pool
from shared.jobs import CHUNK_STAGE, ClaimedJob, Lease, Status
from shared.notify import JobListener
from shared.worker import BaseWorker

CONCURRENCIES = (1, 4)
SYSTEMS = ("ingestd", "ingestd-transaction", "pgqueuer")
# pgqueuer's default dequeue batch; BaseWorker claims the same number per round.
BATCH_SIZE = 10

INSERT_JOBS_SQL = """
WITH docs AS (
    INSERT INTO documents (document_id, user_id, content_type, byte_size, raw_sha256, raw_path)
    SELECT gen_random_uuid(), 'bench', 'text/plain', 1, md5(n::text), 'raw/bench/' || n
    FROM generate_series(1, $1) AS n
    RETURNING document_id, raw_path
)
INSERT INTO upload_jobs
    (job_id, user_id, document_id, status, raw_path, chunker_name, chunker_version,
     embed_model, embed_version)
SELECT gen_random_uuid(), 'bench', document_id, 'parse_validated', raw_path,
       'noop', 'noop-1', 'noop', 'noop-1'
FROM docs
"""


class NoopWorker(BaseWorker):
    """Claims chunk-stage jobs and moves each on at once, with no stage work.

    With batched set, each job goes through BaseWorker.hand_off; otherwise
    through jobs.advance in a transaction of its own.
    """

    spec = CHUNK_STAGE

    def __init__(self, *, done: Any, batched: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._done = done
        self._batched = batched

    async def process(self, job: ClaimedJob, lease: Lease) -> None:
        if self._batched:
            await self.hand_off(lease, Status.CHUNKS_STORED)
        else:
            async with self.pool.acquire() as connection, connection.transaction():
                await jobs.advance(
                    connection, lease, Status.CHUNKS_STORED, keep_lease=False
                )
        with self._done.get_lock():
            self._done.value += 1


async def _wait_count(done: Any, total: int, runner: asyncio.Task[None]) -> None:
    """Return once total jobs are done; raise if the runner ends first."""
    while done.value < total:
        if runner.done():
            runner.result()
            raise RuntimeError(f"the worker stopped with {done.value} of {total} done")
        await asyncio.sleep(0.005)


async def _ingestd_worker(
    url: str, done: Any, total: int, barrier: Any, *, batched: bool
) -> None:
    settings = Settings(
        database_url=url,
        claim_batch_size=BATCH_SIZE,
        max_concurrent_jobs=2 * BATCH_SIZE,
        db_pool_max_size=2 * BATCH_SIZE + 2,
        log_level="WARNING",
    )
    pool = await create_pool(url, settings)
    listener = JobListener(url, service="bench")
    listener.start()
    worker = NoopWorker(
        done=done,
        batched=batched,
        pool=pool,
        database_url=url,
        settings=settings,
        listener=listener,
    )
    await asyncio.to_thread(barrier.wait)
    runner = asyncio.create_task(worker.run())
    await _wait_count(done, total, runner)
    await worker.drain(5)
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await listener.stop()
    await pool.close()


async def _pgqueuer_worker(url: str, done: Any, total: int, barrier: Any) -> None:
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.models import Job

    connection = await asyncpg.connect(url)
    manager = QueueManager(Queries(AsyncpgDriver(connection)))

    @manager.entrypoint("noop")
    async def noop(job: Job) -> None:
        with done.get_lock():
            done.value += 1

    await asyncio.to_thread(barrier.wait)
    runner = asyncio.create_task(
        manager.run(batch_size=BATCH_SIZE, dequeue_timeout=timedelta(seconds=1))
    )
    await _wait_count(done, total, runner)
    manager.shutdown.set()
    await runner
    await connection.close()


def _worker_main(system: str, url: str, done: Any, total: int, barrier: Any) -> None:
    if system == "pgqueuer":
        asyncio.run(_pgqueuer_worker(url, done, total, barrier))
    else:
        batched = system == "ingestd"
        asyncio.run(_ingestd_worker(url, done, total, barrier, batched=batched))


async def _prepare(server_url: str, system: str, total: int) -> str:
    url = await harness.create_database(server_url, migrate=system != "pgqueuer")
    connection = await asyncpg.connect(url)
    try:
        if system != "pgqueuer":
            await connection.execute(INSERT_JOBS_SQL, total)
        else:
            from pgqueuer import AsyncpgDriver, Queries

            queries = Queries(AsyncpgDriver(connection))
            await queries.install()
            await queries.enqueue(["noop"] * total, [None] * total, [0] * total)
        # Statistics of the filled tables, as autovacuum would have them on
        # a running system: without them the planner takes the fresh queue
        # for nearly empty and sorts every waiting row on each claim.
        await connection.execute("ANALYZE")
    finally:
        await connection.close()
    return url


async def _remaining(url: str, system: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        if system != "pgqueuer":
            return await connection.fetchval(
                "SELECT count(*) FROM upload_jobs WHERE status <> 'chunks_stored'"
            )
        return await connection.fetchval(
            "SELECT count(*) FROM pgqueuer WHERE status <> 'successful'"
        )
    finally:
        await connection.close()


def run_one(server_url: str, system: str, workers: int, total: int) -> dict[str, Any]:
    """Drain total no-op jobs with the given number of worker processes."""
    url = asyncio.run(_prepare(server_url, system, total))
    context = multiprocessing.get_context("spawn")
    done = context.Value("i", 0)
    barrier = context.Barrier(workers + 1)
    processes = [
        context.Process(target=_worker_main, args=(system, url, done, total, barrier))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    barrier.wait(timeout=120)
    started = time.perf_counter()
    while done.value < total:
        time.sleep(0.002)
        if not all(process.is_alive() for process in processes):
            for process in processes:
                process.kill()
            raise RuntimeError(
                f"a {system} worker exited with {done.value} of {total} jobs done"
            )
    elapsed = time.perf_counter() - started
    for process in processes:
        process.join(timeout=60)
    remaining = asyncio.run(_remaining(url, system))
    return {
        "system": system,
        "workers": workers,
        "jobs": total,
        "seconds": elapsed,
        "jobs_per_second": total / elapsed,
        "jobs_not_done_after_stop": remaining,
    }


def run_rounds(server_url: str, total: int, rounds: int) -> list[dict[str, Any]]:
    """Run every system at every concurrency, rounds times over.

    Each round runs the systems back to back, so the two sides of a ratio
    see about the same load, and rotates their order, so none always runs
    first.
    """
    runs = []
    for round_number in range(rounds):
        order = (
            SYSTEMS[round_number % len(SYSTEMS) :]
            + SYSTEMS[: round_number % len(SYSTEMS)]
        )
        for workers in CONCURRENCIES:
            for system in order:
                run = run_one(server_url, system, workers, total)
                run["round"] = round_number + 1
                runs.append(run)
    return runs


def round_ratios(runs: list[dict[str, Any]], system: str, workers: int) -> list[float]:
    """Return system's jobs/s over pgqueuer's at one concurrency, one per round."""
    rates: dict[tuple[str, int], float] = {
        (run["system"], run["round"]): run["jobs_per_second"]
        for run in runs
        if run["workers"] == workers
    }
    rounds = sorted({run["round"] for run in runs})
    return [rates[system, number] / rates["pgqueuer", number] for number in rounds]


def median_ratios(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return, per ingestd system and concurrency, the round ratios and their median."""
    summary: dict[str, dict[str, Any]] = {}
    for system in ("ingestd", "ingestd-transaction"):
        summary[system] = {}
        for workers in CONCURRENCIES:
            ratios = round_ratios(runs, system, workers)
            summary[system][str(workers)] = {
                "per_round": ratios,
                "median": statistics.median(ratios),
            }
    return summary


def print_runs(runs: list[dict[str, Any]], summary: dict[str, dict[str, Any]]) -> None:
    rows = [
        [
            run["system"],
            run["workers"],
            run["round"],
            run["jobs"],
            run["seconds"],
            run["jobs_per_second"],
            run["jobs_not_done_after_stop"],
        ]
        for run in runs
    ]
    for workers in CONCURRENCIES:
        for system, ratios in summary.items():
            median = ratios[str(workers)]["median"]
            rows.append(
                [f"median ratio {system} / pgqueuer", workers, "", "", "", median, ""]
            )
    harness.print_table(
        "No-op jobs: BaseWorker vs pgqueuer",
        ["system", "workers", "round", "jobs", "seconds", "jobs/s", "not done"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--jobs", type=int, default=None, help="jobs per run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of all runs; the ratios reported are the medians over the "
        "rounds (default: 3, or 1 with --smoke)",
    )
    args = parser.parse_args()
    total = args.jobs or (200 if args.smoke else 20000)
    rounds = args.rounds or (1 if args.smoke else 3)

    with harness.embedded_postgres() as server_url:
        runs = run_rounds(server_url, total, rounds)
    summary = median_ratios(runs)
    print_runs(runs, summary)

    medians = {
        system: {workers: ratio["median"] for workers, ratio in ratios.items()}
        for system, ratios in summary.items()
    }
    path = harness.write_result(
        "queue_vs_pgqueuer",
        {
            "batch_size": BATCH_SIZE,
            "rounds": rounds,
            "runs": runs,
            "ratio_ingestd_to_pgqueuer": medians["ingestd"],
            "ratio_ingestd_transaction_to_pgqueuer": medians["ingestd-transaction"],
            "ratios_per_round": {
                system: {
                    workers: ratio["per_round"] for workers, ratio in ratios.items()
                }
                for system, ratios in summary.items()
            },
        },
        smoke=args.smoke,
        results_dir=args.results_dir,
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
