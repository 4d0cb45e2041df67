"""Failpoints: named places in the stage code where a fault can be injected.

The reliability tests use them to stop a worker at an exact step, for
example after the first embedding batch is durable, and then kill, freeze
or signal the process. They are off unless ``INGESTD_FAILPOINTS`` is set,
and an unset variable costs one dictionary lookup per failpoint.

``INGESTD_FAILPOINTS`` is a ``;``-separated list of ``NAME[@DOCUMENT_ID]=ACTION``.
A failpoint with a document id fires only for that document. Actions:

- ``pause``: wait until the task is cancelled or the process is killed.
- ``sleep(SECONDS)``: wait, then go on.
- ``burn(SECONDS)``: keep a worker thread busy in pure Python for that long,
  holding the GIL as CPU-bound stage work does, then go on.
- ``raise``: raise RuntimeError, an error the stage did not anticipate.
- ``crash``: kill the whole process with SIGKILL, as an out-of-memory kill would.

The names in use are listed in ``NAMES``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)

ENV_VAR = "INGESTD_FAILPOINTS"

NAMES = frozenset(
    {
        # After an upload's raw file is in place, before its rows are written.
        "upload.before_record",
        # After the parse child returned, before the parsed text is stored.
        "parse.before_store",
        # Before the chunk stage reads the parsed text.
        "chunk.start",
        # After chunking, before the chunks are written.
        "chunk.before_store",
        # Before a batch of chunk texts goes to the embedding backend.
        "embed.before_batch",
        # After one embedding batch was committed.
        "embed.batch_stored",
        # Before the buffers are promoted and the job is marked complete.
        "embed.before_finalize",
    }
)

_ACTION_RE = re.compile(r"^(pause|raise|crash|sleep|burn)(?:\((\d+(?:\.\d+)?)\))?$")


@dataclass(frozen=True)
class Failpoint:
    """One configured fault: where, for which document, and what happens."""

    name: str
    document_id: uuid.UUID | None
    action: str
    seconds: float


class FailpointError(RuntimeError):
    """The error a ``raise`` failpoint throws."""


def parse_failpoints(spec: str) -> dict[str, list[Failpoint]]:
    """Parse an ``INGESTD_FAILPOINTS`` value, raising ValueError on a bad entry."""
    points: dict[str, list[Failpoint]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        target, sep, action_text = entry.partition("=")
        name, _, document = target.strip().partition("@")
        match = _ACTION_RE.match(action_text.strip())
        if not sep or name not in NAMES or match is None:
            raise ValueError(
                f"{ENV_VAR} entry {entry!r} is invalid; write NAME[@DOCUMENT_ID]=ACTION "
                f"with NAME one of {sorted(NAMES)} and ACTION one of pause, raise, "
                "crash, sleep(SECONDS) or burn(SECONDS)"
            )
        action, seconds = match.group(1), match.group(2)
        if action in ("sleep", "burn") and seconds is None:
            raise ValueError(f"{ENV_VAR} entry {entry!r} needs a duration: {action}(5)")
        document_id = uuid.UUID(document) if document else None
        points.setdefault(name, []).append(
            Failpoint(name, document_id, action, float(seconds or 0))
        )
    return points


@functools.cache
def _configured() -> dict[str, list[Failpoint]]:
    points = parse_failpoints(os.environ.get(ENV_VAR, ""))
    if points:
        log.warning(
            "fault injection is on; never set %s in production",
            ENV_VAR,
            extra={"event": "failpoints_enabled", "failpoints": sorted(points)},
        )
    return points


def reload() -> None:
    """Read ``INGESTD_FAILPOINTS`` again on the next hit."""
    _configured.cache_clear()


def _burn(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    total = 0
    while time.monotonic() < deadline:
        for value in range(10_000):
            total += value * value


async def hit(name: str, *, document_id: uuid.UUID | None = None) -> None:
    """Run the fault configured for name and document_id, if there is one."""
    points = _configured().get(name)
    if not points:
        return
    for point in points:
        if point.document_id is not None and point.document_id != document_id:
            continue
        log.warning(
            "failpoint %s fires: %s",
            name,
            point.action,
            extra={
                "event": "failpoint",
                "failpoint": name,
                "action": point.action,
                "document_id": str(document_id) if document_id else None,
            },
        )
        if point.action == "pause":
            await asyncio.Event().wait()
        elif point.action == "sleep":
            await asyncio.sleep(point.seconds)
        elif point.action == "burn":
            await asyncio.to_thread(_burn, point.seconds)
        elif point.action == "raise":
            raise FailpointError(f"failpoint {name} raised for document {document_id}")
        elif point.action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
