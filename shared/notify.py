"""A LISTEN connection that survives database restarts.

One dedicated connection per process listens on the job channel and hands
each notification to the subscribers. The connection is never taken from a
pool (a transaction pooler would drop LISTEN). When it drops, the listener
reconnects with backoff and wakes every subscriber once, because
notifications sent while it was away are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from shared.db import connect
from shared.errors import DATABASE_ERRORS
from shared.jobs import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

# A subscriber gets the decoded payload, or None for "something may have
# been missed, look again".
Subscriber = Callable[[dict[str, Any] | None], None]


def notified_job_ids(payload: dict[str, Any]) -> list[str]:
    """Return the ids of the jobs a notification payload names.

    A payload names one job under "job_id", or the jobs of one batched
    hand-off under "job_ids".
    """
    if "job_ids" in payload:
        return [str(job_id) for job_id in payload["job_ids"]]
    job_id = payload.get("job_id")
    return [str(job_id)] if job_id is not None else []


class JobListener:
    """Delivers job notifications to in-process subscribers."""

    def __init__(
        self,
        database_url: str,
        *,
        service: str = "ingestd",
        reconnect_max_seconds: float = 5.0,
    ) -> None:
        self._url = database_url
        self._service = service
        self._reconnect_max_seconds = reconnect_max_seconds
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self.connected = asyncio.Event()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; return a function that removes it."""
        self._subscribers.add(subscriber)
        return lambda: self._subscribers.discard(subscriber)

    def start(self) -> None:
        """Start listening in a background task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="job-listener")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _dispatch(self, payload: dict[str, Any] | None) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(payload)
            except Exception:
                log.exception(
                    "job notification subscriber failed",
                    extra={"event": "listener_subscriber_error"},
                )

    def _on_notification(
        self, _connection: Any, _pid: int, _channel: str, payload: str
    ) -> None:
        try:
            decoded = json.loads(payload)
        except ValueError:
            log.warning(
                "ignoring malformed job notification",
                extra={"event": "listener_bad_payload", "payload": payload[:200]},
            )
            return
        self._dispatch(decoded)

    def _on_termination(self, _connection: Any) -> None:
        self._lost.set()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await connect(self._url)
                await connection.add_listener(NOTIFY_CHANNEL, self._on_notification)
                connection.add_termination_listener(self._on_termination)
                self._lost.clear()
                self.connected.set()
                log.info(
                    "listening for job notifications",
                    extra={"event": "listener_connected", "service": self._service},
                )
                # Anything sent while disconnected is gone: look again.
                self._dispatch(None)
                delay = 0.1
                reason = await self._wait_until_lost(connection)
                log.warning(
                    "job notification connection lost; reconnecting",
                    extra={
                        "event": "listener_lost",
                        "service": self._service,
                        "reason": reason,
                    },
                )
            except asyncio.CancelledError:
                raise
            except DATABASE_ERRORS as exc:
                log.warning(
                    "cannot listen for job notifications; retrying in %.1f s",
                    delay,
                    extra={
                        "event": "listener_reconnect",
                        "service": self._service,
                        "reason": str(exc),
                    },
                )
            finally:
                self.connected.clear()
                if connection is not None and not connection.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), timeout=2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._reconnect_max_seconds)

    async def _wait_until_lost(self, connection: asyncpg.Connection) -> str:
        """Wait until the connection drops; return why, for the log."""
        # The termination callback fires when the server closes the socket,
        # and the periodic ping catches a connection that died silently.
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=10)
            if self._lost.is_set() or connection.is_closed():
                break
            try:
                await asyncio.wait_for(connection.execute("SELECT 1"), timeout=5)
            except (
                OSError,
                TimeoutError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
            ) as exc:
                return f"ping failed: {type(exc).__name__}: {exc}"
        return "the server closed the connection"
