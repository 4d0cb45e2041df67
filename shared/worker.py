"""BaseWorker: claims jobs for one stage, keeps their leases alive, runs them.

A stage subclass implements ``process``, and the base class runs the
protocol around it. It claims in a short transaction and renews the lease
from a heartbeat task on its own connections. It turns failures into retries
or failed statuses, wakes on notifications with polling as the fallback, and
drains on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from shared import jobs
from shared.config import Settings
from shared.db import DedicatedConnection, create_pool
from shared.errors import DATABASE_ERRORS, backoff_seconds, classify_error
from shared.handoff import HandOffBuffer
from shared.jobs import ClaimedJob, Lease, LeaseLostError, StageSpec, Status
from shared.notify import JobListener

log = logging.getLogger(__name__)

# Longest wait before a retry, whatever Retry-After a remote service sends.
MAX_RETRY_DELAY_SECONDS = 24 * 3600.0


def make_worker_id(stage: str) -> str:
    """Build a worker identity that is unique across hosts and restarts."""
    return f"{stage}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class _RunningJob:
    job: ClaimedJob
    lease: Lease
    work: asyncio.Task[None]
    releasing: bool = False


@dataclass
class WorkerCounters:
    """Counts of a worker's outcomes since it started."""

    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    leases_lost: int = 0
    released: int = 0
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class BaseWorker(ABC):
    """Runs one pipeline stage against the job table."""

    spec: StageSpec
    # Set by a subclass to claim only jobs stamped with its version.
    chunker_version: str | None = None
    embed_version: str | None = None

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        database_url: str,
        settings: Settings,
        listener: JobListener,
        worker_id: str | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.worker_id = worker_id or make_worker_id(self.spec.name)
        self.counters = WorkerCounters()
        self._database_url = database_url
        self._listener = listener
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: dict[uuid.UUID, _RunningJob] = {}
        self._runners: set[asyncio.Task[None]] = set()
        # Running jobs that have not called hand_off yet. While none is
        # left, no further hand-off can join a batch, so it flushes at once.
        self._busy: set[uuid.UUID] = set()
        self._heartbeat_pool: asyncpg.Pool | None = None
        # Claims run one after another, on a connection of their own whose
        # commits do not wait for the WAL flush. A claim lost in a database
        # crash leaves the job as it was before the claim, so the worker's
        # later writes, guarded by the lost lease token, match no row. Any
        # write that does wait for the flush makes every earlier commit
        # durable with it, because the WAL is written in order.
        self._claim_connection = DedicatedConnection(
            database_url, server_settings={"synchronous_commit": "off"}
        )
        self._hand_offs: HandOffBuffer | None = None
        # While jobs run, a claim waits until this many slots are free, so a
        # worker with many slots claims in batches instead of one claim per
        # finished job. With the default of 2 slots it is 1: claim at once.
        self._refill_threshold = max(
            1,
            min(self.settings.claim_batch_size, self.settings.max_concurrent_jobs) // 2,
        )
        self._wake_statuses = {
            str(status)
            for status, target in self.spec.claims.items()
            if status != target
        }

    @abstractmethod
    async def process(self, job: ClaimedJob, lease: Lease) -> None:
        """Run the stage for one job and advance it with guarded transitions.

        Raise PermanentError or TransientError to fail or retry the job, and
        let LeaseLostError through when a guarded write finds the lease gone.
        CPU-bound work must run off the event loop.
        """

    # Logging helpers ------------------------------------------------------

    def _fields(
        self, job: ClaimedJob | None, event: str, **extra: Any
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "event": event,
            "worker": self.worker_id,
            "stage": self.spec.name,
        }
        if job is not None:
            fields["job_id"] = str(job.job_id)
            fields["document_id"] = str(job.document_id)
        fields.update(extra)
        return fields

    # Lifecycle ------------------------------------------------------------

    @property
    def accepting_work(self) -> bool:
        """False once shutdown has begun."""
        return not self._stopping.is_set()

    @property
    def active_job_ids(self) -> list[uuid.UUID]:
        """Jobs this worker holds a lease on."""
        return list(self._running)

    def request_stop(self) -> None:
        """Stop claiming new jobs. Running jobs go on."""
        if not self._stopping.is_set():
            log.info(
                "worker stops claiming", extra=self._fields(None, "worker_stopping")
            )
        self._stopping.set()
        self._wake.set()
        if self._hand_offs is not None:
            self._hand_offs.hurry()

    async def run(self) -> None:
        """Claim and run jobs until request_stop is called."""
        self._heartbeat_pool = await self._open_heartbeat_pool()
        if self._heartbeat_pool is None:
            return
        self._hand_offs = HandOffBuffer(
            self._database_url,
            worker=self.worker_id,
            max_batch=self.settings.hand_off_batch_size,
            max_delay_seconds=self.settings.hand_off_max_delay_seconds,
            busy_jobs=lambda: len(self._busy),
        )
        self._hand_offs.start()
        unsubscribe = self._listener.subscribe(self._on_notification)
        log.info(
            "worker started",
            extra=self._fields(
                None,
                "worker_started",
                max_concurrent_jobs=self.settings.max_concurrent_jobs,
                lease_seconds=self.settings.lease_seconds,
            ),
        )
        try:
            await self._claim_loop()
        finally:
            unsubscribe()
            await self._claim_connection.close()

    async def _open_heartbeat_pool(self) -> asyncpg.Pool | None:
        """Create the heartbeat pool, retrying until the database accepts connections.

        Returns None when the worker is stopped before that.
        """
        settings = self.settings.model_copy(
            update={
                "db_pool_min_size": 1,
                "db_pool_max_size": self.settings.max_concurrent_jobs + 1,
            }
        )
        failures = 0
        while not self._stopping.is_set():
            try:
                return await create_pool(self._database_url, settings)
            except DATABASE_ERRORS as exc:
                delay = backoff_seconds(
                    failures, base=0.5, maximum=self.settings.poll_interval_seconds
                )
                failures += 1
                log.warning(
                    "cannot open the heartbeat pool; retrying in %.1f s",
                    delay,
                    extra=self._fields(None, "heartbeat_pool_failed", reason=str(exc)),
                )
                await self._sleep_or_stop(delay)
        return None

    async def drain(self, grace_seconds: float) -> None:
        """Let running jobs finish within grace_seconds, then release the rest.

        A released job goes back to its claimable status with its attempt
        given back and its lease cleared, so another worker takes it at once.
        """
        self.request_stop()
        if self._runners:
            log.info(
                "waiting for running jobs",
                extra=self._fields(
                    None,
                    "worker_draining",
                    jobs=len(self._runners),
                    grace_seconds=grace_seconds,
                ),
            )
            _done, pending = await asyncio.wait(
                set(self._runners), timeout=grace_seconds
            )
            if pending:
                for running in self._running.values():
                    running.releasing = True
                    running.work.cancel()
                await asyncio.wait(pending)
        if self._hand_offs is not None:
            await self._hand_offs.close()
        if self._heartbeat_pool is not None:
            await self._heartbeat_pool.close()
            self._heartbeat_pool = None
        log.info("worker stopped", extra=self._fields(None, "worker_stopped"))

    def _on_notification(self, payload: dict[str, Any] | None) -> None:
        # In-flight statuses are claimable only after their lease expires, which
        # sends no notification, so only hand-offs into the stage wake it.
        if payload is None or payload.get("status") in self._wake_statuses:
            self._wake.set()

    # Claiming -------------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            # Cleared before claiming, so a notification that arrives during
            # the claim still triggers another round.
            self._wake.clear()
            free = self.settings.max_concurrent_jobs - len(self._running)
            batch_full = False
            if free >= self._refill_threshold or (free > 0 and not self._running):
                limit = min(free, self.settings.claim_batch_size)
                try:
                    claimed = await self._claim(limit)
                    failures = 0
                except Exception as exc:
                    # Whatever the claim raised, the loop must go on: a worker
                    # whose loop ended would look healthy and claim nothing.
                    failures += 1
                    await self._claim_connection.discard()
                    delay = backoff_seconds(
                        failures - 1,
                        base=0.5,
                        maximum=self.settings.poll_interval_seconds,
                    )
                    log.warning(
                        "claim failed; retrying in %.1f s",
                        delay,
                        exc_info=not isinstance(exc, DATABASE_ERRORS),
                        extra=self._fields(
                            None,
                            "claim_failed",
                            reason=f"{type(exc).__name__}: {exc}",
                        ),
                    )
                    await self._sleep_or_stop(delay)
                    continue
                for job in claimed:
                    self._start_job(job)
                batch_full = len(claimed) == limit
            # A full batch means more may be waiting: claim again at once
            # while there is room, otherwise sleep until woken.
            if batch_full and len(self._running) < self.settings.max_concurrent_jobs:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), timeout=self.settings.poll_interval_seconds
                )

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _claim(self, limit: int) -> list[ClaimedJob]:
        claimed = await jobs.claim_jobs(
            await self._claim_connection.get(),
            self.spec,
            worker=self.worker_id,
            limit=limit,
            lease_seconds=self.settings.lease_seconds,
            chunker_version=self.chunker_version,
            embed_version=self.embed_version,
        )
        # The per-job records are built only when they will be written: at
        # thousands of jobs a second their dictionaries cost measurable time.
        if not log.isEnabledFor(logging.INFO):
            return claimed
        for job in claimed:
            log.info(
                "claimed job",
                extra=self._fields(
                    job,
                    "job_claimed",
                    from_status=str(job.claimed_from),
                    status=str(job.status),
                    attempt=job.attempts,
                ),
            )
        return claimed

    def _start_job(self, job: ClaimedJob) -> None:
        lease = Lease(job.job_id, job.lease_token, self.worker_id, job.status)
        work = asyncio.create_task(
            self._process_or_expire(job, lease), name=f"{self.spec.name}:{job.job_id}"
        )
        self._running[job.job_id] = _RunningJob(job, lease, work)
        self._busy.add(job.job_id)
        runner = asyncio.create_task(
            self._supervise(job.job_id), name=f"supervise:{job.job_id}"
        )
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)

    async def _process_or_expire(self, job: ClaimedJob, lease: Lease) -> None:
        if job.attempts > job.max_attempts:
            raise _AttemptsExhausted(job.attempts - 1)
        await self.process(job, lease)

    async def hand_off(
        self,
        lease: Lease,
        to_status: Status,
        *,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Move the job to to_status and clear its lease, batched with other jobs.

        Only for a last step whose only write is the job row. A step whose
        output must commit together with the move uses jobs.advance in its
        own transaction instead. Returns once the move is committed, with its
        job_events row and notification. Raises LeaseLostError when the
        lease is gone.
        """
        if self._hand_offs is None:
            raise RuntimeError("hand_off needs a running worker: call run() first")
        self._busy.discard(lease.job_id)
        await self._hand_offs.hand_off(lease, to_status, detail)

    # Running one job ------------------------------------------------------

    async def _supervise(self, job_id: uuid.UUID) -> None:
        running = self._running[job_id]
        job, lease = running.job, running.lease
        heartbeat: asyncio.Task[None] | None = None

        def start_heartbeat() -> None:
            nonlocal heartbeat
            heartbeat = asyncio.create_task(
                self._heartbeat(running), name=f"heartbeat:{job_id}"
            )

        # A timer until the first renewal, so that a job finishing within
        # one heartbeat interval never needs a heartbeat task of its own.
        first_beat = asyncio.get_running_loop().call_later(
            self.settings.heartbeat_interval_seconds(), start_heartbeat
        )
        try:
            await running.work
        except LeaseLostError as exc:
            self._lease_lost(job, str(exc))
        except asyncio.CancelledError:
            if lease.lost:
                self._lease_lost(job, "heartbeat found the lease taken")
            elif running.releasing:
                await asyncio.shield(self._release(job, lease))
            else:
                raise
        except _AttemptsExhausted as exc:
            await asyncio.shield(
                self._fail(
                    job,
                    lease,
                    "max_attempts_exceeded",
                    f"the job was claimed {exc.attempts} times without finishing, "
                    "so a worker probably crashed on this document; inspect it and "
                    "call RetryJob to try again",
                )
            )
        except Exception as exc:
            await asyncio.shield(self._handle_failure(job, lease, exc))
        else:
            self.counters.succeeded += 1
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "stage finished",
                    extra=self._fields(job, "stage_finished", status=str(lease.status)),
                )
        finally:
            first_beat.cancel()
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
            self._running.pop(job_id, None)
            self._busy.discard(job_id)
            self._wake.set()

    async def _heartbeat(self, running: _RunningJob) -> None:
        """Renew the lease now and then every heartbeat interval."""
        interval = self.settings.heartbeat_interval_seconds()
        lease = running.lease
        while True:
            assert self._heartbeat_pool is not None
            try:
                async with self._heartbeat_pool.acquire() as connection:
                    expires = await jobs.renew_lease(
                        connection, lease, self.settings.lease_seconds
                    )
            except Exception as exc:
                # The lease may still be valid; try again at the next beat.
                # Should it expire meanwhile, the guarded writes catch it.
                log.warning(
                    "heartbeat failed",
                    extra=self._fields(
                        running.job, "heartbeat_failed", reason=str(exc)
                    ),
                )
            else:
                if expires is None:
                    lease.lost = True
                    running.work.cancel()
                    return
            await asyncio.sleep(interval)

    def _lease_lost(self, job: ClaimedJob, reason: str) -> None:
        self.counters.leases_lost += 1
        log.warning(
            "lost the lease; dropping the job's work",
            extra=self._fields(job, "lease_lost", reason=reason),
        )

    async def _release(self, job: ClaimedJob, lease: Lease) -> None:
        try:
            async with self.pool.acquire() as connection:
                released = await jobs.release(connection, lease, self.spec)
        except DATABASE_ERRORS as exc:
            log.warning(
                "could not release the job; it becomes claimable when its lease expires",
                extra=self._fields(job, "release_failed", reason=str(exc)),
            )
            return
        if released:
            self.counters.released += 1
            log.info(
                "released unfinished job",
                extra=self._fields(
                    job,
                    "job_released",
                    status=str(lease.status),
                    reason="shutdown grace period ended before the stage finished",
                ),
            )
        else:
            self._lease_lost(job, "lease gone at release")

    async def _handle_failure(
        self, job: ClaimedJob, lease: Lease, exc: Exception
    ) -> None:
        verdict = classify_error(exc)
        if verdict.code == "internal_error":
            log.error(
                "stage raised an unexpected error",
                exc_info=exc,
                extra=self._fields(job, "stage_error"),
            )
        # A retry needs another claim, so a job on its last attempt fails now
        # with its real error instead of coming back only to be failed for
        # running out of attempts.
        if (
            verdict.transient
            and job.retry_count < self.settings.max_retries
            and job.attempts < job.max_attempts
        ):
            delay = backoff_seconds(
                job.retry_count,
                base=self.settings.backoff_base_seconds,
                maximum=self.settings.backoff_max_seconds,
            )
            if verdict.retry_after_seconds is not None:
                # A remote service's Retry-After may exceed the backoff cap,
                # but never MAX_RETRY_DELAY_SECONDS, which keeps run_after
                # within PostgreSQL's interval range.
                delay = min(
                    max(delay, verdict.retry_after_seconds), MAX_RETRY_DELAY_SECONDS
                )
            await self._retry(job, lease, verdict.code, verdict.message, delay)
            return
        message = verdict.message
        if verdict.transient:
            message = (
                f"{message} (gave up after {job.retry_count} retries and "
                f"{job.attempts} of {job.max_attempts} attempts)"
            )
        await self._fail(job, lease, verdict.code, message)

    async def _retry(
        self, job: ClaimedJob, lease: Lease, code: str, message: str, delay: float
    ) -> None:
        try:
            async with self.pool.acquire() as connection:
                scheduled = await jobs.schedule_retry(
                    connection,
                    lease,
                    self.spec,
                    code=code,
                    message=message,
                    retry_count=job.retry_count,
                    delay_seconds=delay,
                )
        except DATABASE_ERRORS as exc:
            log.warning(
                "could not schedule the retry; the job becomes claimable when its lease expires",
                extra=self._fields(job, "retry_write_failed", reason=str(exc)),
            )
            return
        if not scheduled:
            self._lease_lost(job, "lease gone when scheduling a retry")
            return
        self.counters.retried += 1
        log.warning(
            "stage failed; retrying in %.1f s",
            delay,
            extra=self._fields(
                job,
                "job_retry",
                code=code,
                reason=message,
                retry=job.retry_count + 1,
                delay_seconds=round(delay, 3),
            ),
        )

    async def _fail(
        self, job: ClaimedJob, lease: Lease, code: str, message: str
    ) -> None:
        try:
            async with self.pool.acquire() as connection:
                failed = await jobs.fail(
                    connection,
                    lease,
                    self.spec,
                    code=code,
                    message=message,
                    retry_count=job.retry_count,
                )
        except DATABASE_ERRORS as exc:
            log.warning(
                "could not record the failure; the job becomes claimable when its lease expires",
                extra=self._fields(job, "fail_write_failed", reason=str(exc)),
            )
            return
        if not failed:
            self._lease_lost(job, "lease gone when recording a failure")
            return
        self.counters.failed += 1
        log.warning(
            "job failed permanently",
            extra=self._fields(
                job,
                "job_failed",
                code=code,
                reason=message,
                status=str(self.spec.failed),
            ),
        )

    # Status ---------------------------------------------------------------

    async def queue_depth(self) -> int:
        """Jobs waiting for this stage across all workers."""
        async with self.pool.acquire() as connection:
            return await jobs.queue_depth(connection, self.spec)


class _AttemptsExhausted(Exception):
    def __init__(self, attempts: int) -> None:
        super().__init__(f"{attempts} attempts used")
        self.attempts = attempts
