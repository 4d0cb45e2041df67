"""Batched hand-offs of jobs whose last step writes nothing but the job row.

A stage step that only moves a job to the next stage's status, with no
output of its own to commit in the same transaction, can give the move to a
HandOffBuffer instead of running a transaction per job. The buffer collects
the hand-offs of one worker's running jobs and commits them with one
``jobs.hand_off_jobs`` statement per flush, on a connection of its own, so
no flush pays for a pool acquire and reset. Each caller waits until its row
is committed: a job counts as done only once its move is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared import jobs
from shared.db import DedicatedConnection
from shared.jobs import HandOff, Lease, LeaseLostError, Status

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    hand_off: HandOff
    moved: asyncio.Future[bool]
    queued_at: float


class HandOffBuffer:
    """Commits the hand-offs of one worker's jobs in batches.

    A flush starts when max_batch hand-offs wait, or when the oldest has
    waited max_delay_seconds. It also starts at once after hurry() or
    close(), and when busy_jobs() returns 0: then no job of the worker is
    still working towards a hand-off that could join the batch.
    """

    def __init__(
        self,
        database_url: str,
        *,
        worker: str,
        max_batch: int,
        max_delay_seconds: float,
        busy_jobs: Callable[[], int],
    ) -> None:
        self._connection = DedicatedConnection(database_url)
        self._worker = worker
        # One flush's notification names every job it moved.
        self._max_batch = min(max_batch, jobs.MAX_NOTIFY_JOB_IDS)
        self._max_delay_seconds = max_delay_seconds
        self._busy_jobs = busy_jobs
        self._waiting: list[_Waiting] = []
        self._changed = asyncio.Event()
        self._hurry = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the flush task."""
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"hand-offs:{self._worker}"
            )

    def hurry(self) -> None:
        """Flush every waiting and later hand-off at once, without batching delay."""
        self._hurry = True
        self._changed.set()

    async def close(self) -> None:
        """Flush what waits, stop the flush task and close the connection."""
        self._closing = True
        self._changed.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._connection.close()

    async def hand_off(
        self,
        lease: Lease,
        to_status: Status,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue the job's move to to_status and wait until it is committed.

        Raises LeaseLostError when the guard matched no row, the database
        error when the flush failed, and RuntimeError once the buffer is
        closed.
        """
        if self._task is None or self._task.done():
            raise RuntimeError(
                f"the hand-off buffer of worker {self._worker} is not running; "
                "hand off jobs between start() and close()"
            )
        loop = asyncio.get_running_loop()
        waiting = _Waiting(
            HandOff(lease.job_id, lease.token, lease.status, to_status, detail or {}),
            loop.create_future(),
            loop.time(),
        )
        self._waiting.append(waiting)
        self._changed.set()
        try:
            moved = await waiting.moved
        except asyncio.CancelledError:
            # Not taken by a flush yet: withdraw it, so that a job released
            # or lost meanwhile is not moved after all. A flush that already
            # took it decides, guarded by the lease like any other.
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiting)
            raise
        if not moved:
            raise LeaseLostError(lease.job_id, str(lease.status))
        lease.status = to_status

    def _flush_due(self, now: float) -> bool:
        if self._hurry or self._closing:
            return True
        if len(self._waiting) >= self._max_batch or self._busy_jobs() == 0:
            return True
        return now >= self._waiting[0].queued_at + self._max_delay_seconds

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Waiting] = []
        try:
            while True:
                # Cleared before the checks, so a change made during a flush
                # or a check still ends the wait below.
                self._changed.clear()
                if not self._waiting:
                    if self._closing:
                        return
                    await self._changed.wait()
                    continue
                now = loop.time()
                if not self._flush_due(now):
                    delay = self._waiting[0].queued_at + self._max_delay_seconds - now
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=delay)
                    continue
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                await self._flush(batch)
                batch = []
        finally:
            # Reached with entries only when the task is cancelled: their
            # jobs must not wait forever for a flush that will not come.
            closed = RuntimeError(f"the hand-off buffer of {self._worker} stopped")
            for waiting in batch + self._waiting:
                _settle(waiting, error=closed)
            self._waiting.clear()

    async def _flush(self, batch: list[_Waiting]) -> None:
        try:
            connection = await self._connection.get()
            moved = await jobs.hand_off_jobs(
                connection, self._worker, [waiting.hand_off for waiting in batch]
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self._connection.usable() and len(batch) > 1:
                # A statement error caused by one row would fail the whole
                # batch, so each hand-off is tried again on its own.
                log.warning(
                    "batched hand-off failed; handing the jobs off one at a time",
                    extra=self._fields("hand_off_batch_failed", batch, exc),
                )
                for waiting in batch:
                    await self._flush([waiting])
                return
            log.warning(
                "hand-off failed; the jobs' stages handle the error",
                extra=self._fields("hand_off_failed", batch, exc),
            )
            if not self._connection.usable():
                await self._connection.discard()
            for waiting in batch:
                _settle(waiting, error=exc)
            return
        for waiting in batch:
            _settle(waiting, moved=waiting.hand_off.job_id in moved)

    def _fields(
        self, event: str, batch: list[_Waiting], exc: BaseException
    ) -> dict[str, Any]:
        return {
            "event": event,
            "worker": self._worker,
            "job_ids": [str(waiting.hand_off.job_id) for waiting in batch[:20]],
            "jobs": len(batch),
            "reason": f"{type(exc).__name__}: {exc}",
        }


def _settle(
    waiting: _Waiting, *, moved: bool = False, error: BaseException | None = None
) -> None:
    # A caller cancelled during the flush has cancelled its future already.
    if waiting.moved.done():
        return
    if error is not None:
        waiting.moved.set_exception(error)
    else:
        waiting.moved.set_result(moved)
