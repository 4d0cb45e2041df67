"""The parse stage: uploaded → parse_queued → parsed → parse_validated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import stat
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from shared import failpoints, jobs
from shared.errors import PermanentError, TransientError
from shared.hashing import parsed_sha256
from shared.jobs import PARSE_STAGE, TERMINAL_STATUSES, ClaimedJob, Lease, Status
from shared.notify import notified_job_ids
from shared.storage import LocalBlobStore, describe_write_error, parsed_key
from shared.worker import BaseWorker

log = logging.getLogger(__name__)

# The end of every storage_error message: the stage retries with backoff, and
# a job whose retries ran out waits in failed_parse for an operator.
_STORAGE_ADVICE = (
    "the stage retries; if the job has failed, fix the storage folder "
    "(INGESTD_STORAGE_DIR) and call RetryJob"
)

# Maximum seconds that a spare child's start waits, after a parse, for the
# parsed document to leave the pipeline or for another upload.
SPARE_START_DELAY_SECONDS = 10.0


class ParseWorker(BaseWorker):
    """Extracts Markdown-like text from each upload in a limited child process."""

    spec = PARSE_STAGE

    def __init__(self, *, storage: LocalBlobStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage = storage
        # A child started ahead of the next document, which has imported the
        # parser and waits for its request on stdin.
        self._spare_child: asyncio.subprocess.Process | None = None
        # The task that starts the next spare once it is due, the job whose
        # end it waits for, and the event that makes it due.
        self._spare_starter: asyncio.Task[None] | None = None
        self._spare_after_job: str | None = None
        self._spare_due = asyncio.Event()

    async def drain(self, grace_seconds: float) -> None:
        await super().drain(grace_seconds)
        starter, self._spare_starter = self._spare_starter, None
        if starter is not None:
            # The worker no longer accepts work, so the woken starter
            # returns without starting a child.
            self._spare_due.set()
            await starter
        spare, self._spare_child = self._spare_child, None
        if spare is not None:
            await self._stop_child(spare)

    @staticmethod
    async def _stop_child(process: asyncio.subprocess.Process) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()

    @staticmethod
    async def _start_child() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.gateway.parse_child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def _take_child(self) -> asyncio.subprocess.Process:
        """Return the spare child, or a new one when there is none."""
        process, self._spare_child = self._spare_child, None
        if process is None or process.returncode is not None:
            process = await self._start_child()
        return process

    async def _start_spare(self) -> None:
        """Start the next spare child unless one exists or the worker drains."""
        if not self.accepting_work or self._spare_child is not None:
            return
        spare = await self._start_child()
        # Another job may have started a spare during the await.
        if self._spare_child is None and self.accepting_work:
            self._spare_child = spare
        else:
            await self._stop_child(spare)

    async def run(self) -> None:
        await self._start_spare()
        unsubscribe = self._listener.subscribe(self._on_pipeline_notification)
        try:
            await super().run()
        finally:
            unsubscribe()

    def _schedule_spare(self, job_id: uuid.UUID) -> None:
        """Start the next spare child once it is due (see _wait_until_spare_due)."""
        if self._spare_starter is not None and not self._spare_starter.done():
            # The pending starter waits for the latest parsed job instead.
            self._spare_after_job = str(job_id)
            return
        self._spare_starter = asyncio.create_task(
            self._start_spare_when_due(job_id), name=f"spare-parse-child:{job_id}"
        )

    async def _start_spare_when_due(self, job_id: uuid.UUID) -> None:
        await self._wait_until_spare_due(job_id)
        try:
            await self._start_spare()
        except OSError as exc:
            # The next parse starts a child of its own, and the error
            # surfaces there if it persists.
            log.warning(
                "could not start a spare parse child",
                extra={"event": "spare_child_failed", "reason": str(exc)},
            )

    async def _wait_until_spare_due(self, job_id: uuid.UUID) -> None:
        """Return when the next spare child should start.

        A spare's interpreter start and imports take about 0.2 s of CPU. On
        an otherwise idle pipeline, they would compete with the chunking and
        embedding of the document just parsed, so the spare waits until that
        document reaches a terminal status. It starts at once when another
        parse job is in hand or waiting, at the next upload notification,
        and at the latest after SPARE_START_DELAY_SECONDS.
        """
        # Set before the checks, so an upload notified during them counts.
        self._spare_after_job = str(job_id)
        self._spare_due.clear()
        try:
            if len(self._running) > 1 or await self._parse_jobs_waiting():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._spare_due.wait(), timeout=SPARE_START_DELAY_SECONDS
                )
        finally:
            self._spare_after_job = None

    async def _parse_jobs_waiting(self) -> bool:
        try:
            return await self.queue_depth() > 0
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Unknown, so the spare starts now, as it would for a busy queue.
            log.warning(
                "could not count waiting parse jobs; starting the spare child now",
                extra={"event": "parse_queue_depth_failed", "reason": str(exc)},
            )
            return True

    def _on_pipeline_notification(self, payload: dict[str, Any] | None) -> None:
        watched = self._spare_after_job
        if watched is None:
            return
        # None means notifications may have been missed, so the spare starts.
        if payload is None:
            self._spare_due.set()
            return
        status = payload.get("status")
        if status == Status.UPLOADED or (
            status in TERMINAL_STATUSES and watched in notified_job_ids(payload)
        ):
            self._spare_due.set()

    async def process(self, job: ClaimedJob, lease: Lease) -> None:
        if lease.status == Status.PARSE_QUEUED:
            await self._parse(job, lease)
        if lease.status == Status.PARSED:
            await self._validate(job, lease)

    async def _parse(self, job: ClaimedJob, lease: Lease) -> None:
        async with self.pool.acquire() as connection:
            content_type = await connection.fetchval(
                "SELECT content_type FROM documents WHERE document_id = $1",
                job.document_id,
            )
        raw_file = await self._find_raw_file(job)
        result = await self._run_child(
            job.job_id,
            {
                "path": str(raw_file),
                "content_type": content_type,
                "password": job.parse_password,
                "cpu_seconds": math.ceil(self.settings.parse_timeout_seconds),
                "memory_bytes": self.settings.parse_memory_limit_bytes,
                "max_pages": self.settings.max_pages,
                "max_chars": self.settings.max_parsed_chars,
            },
        )
        if not result["ok"]:
            raise PermanentError(result["code"], result["message"])
        markdown: str = result["markdown"]
        await failpoints.hit("parse.before_store", document_id=job.document_id)
        key = parsed_key(job.user_id, job.document_id)
        digest = parsed_sha256(markdown)
        try:
            await asyncio.to_thread(self.storage.put, key, markdown.encode("utf-8"))
        except OSError as exc:
            raise TransientError(
                "storage_error",
                f"cannot store parsed text {key}: {describe_write_error(exc)}; "
                f"{_STORAGE_ADVICE}",
            ) from exc
        try:
            async with self.pool.acquire() as connection, connection.transaction():
                await jobs.advance(
                    connection,
                    lease,
                    Status.PARSED,
                    set_columns={"parsed_path": key, "parsed_sha256": digest},
                    detail={"chars": len(markdown), "page_count": result["page_count"]},
                )
                await connection.execute(
                    """
                    UPDATE documents
                    SET parsed_path = $2, parsed_sha256 = $3, page_count = $4,
                        page_offsets = $5, encoding = $6
                    WHERE document_id = $1
                    """,
                    job.document_id,
                    key,
                    digest,
                    result["page_count"],
                    result["page_offsets"] or None,
                    result["encoding"],
                )
        except jobs.LeaseLostError:
            await self._remove_orphan(job, key)
            raise
        job.parsed_path, job.parsed_sha256 = key, digest

    async def _find_raw_file(self, job: ClaimedJob) -> Path:
        """Return the path of the job's upload, telling a missing file from broken storage."""
        raw_file = self.storage.path_for(job.raw_path)
        try:
            mode = (await asyncio.to_thread(raw_file.stat)).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            # A folder on the path turned into a file, an I/O error, a lost
            # mount: the upload may come back once the storage is fixed.
            raise TransientError(
                "storage_error",
                f"cannot read uploaded file {job.raw_path}: the blob storage is not "
                f"readable ({exc}); {_STORAGE_ADVICE}",
            ) from exc
        if mode is None or not stat.S_ISREG(mode):
            raise PermanentError(
                "raw_file_missing",
                f"uploaded file {job.raw_path} is missing from storage; upload the document again",
            )
        return raw_file

    async def _remove_orphan(self, job: ClaimedJob, key: str) -> None:
        # A document deleted while it was being parsed must not leave its
        # parsed text behind.
        async with self.pool.acquire() as connection:
            exists = await connection.fetchval(
                "SELECT 1 FROM documents WHERE document_id = $1", job.document_id
            )
        if not exists:
            await asyncio.to_thread(self.storage.delete, key)

    async def _run_child(
        self, job_id: uuid.UUID, request: dict[str, Any]
    ) -> dict[str, Any]:
        process = await self._take_child()
        wall_seconds = self.settings.parse_wall_timeout_seconds
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(json.dumps(request).encode("utf-8")),
                timeout=wall_seconds,
            )
            self._schedule_spare(job_id)
        except TimeoutError:
            process.kill()
            await process.wait()
            log.warning(
                "parse child killed after the wall-clock limit",
                extra={
                    "event": "parse_wall_timeout",
                    "pid": process.pid,
                    "wall_seconds": wall_seconds,
                },
            )
            raise PermanentError(
                "limit_exceeded",
                f"parsing ran longer than {wall_seconds:g} s of wall-clock time "
                "(INGESTD_PARSE_WALL_TIMEOUT_SECONDS), so the parser was killed; "
                "the file is too large or malformed, or the limit is too low",
            ) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        if process.returncode == 0:
            try:
                return json.loads(stdout)
            except ValueError:
                pass
        return self._child_failure(process.returncode, stderr)

    def _child_failure(self, returncode: int | None, stderr: bytes) -> dict[str, Any]:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            cpu_limit = (
                f"the CPU time limit of {self.settings.parse_timeout_seconds:g} s "
                "(INGESTD_PARSE_TIMEOUT_SECONDS)"
            )
            if -returncode == signal.SIGXCPU:
                return {
                    "ok": False,
                    "code": "limit_exceeded",
                    "message": f"the parser was stopped by {name}: it exceeded {cpu_limit}",
                }
            if -returncode == signal.SIGKILL:
                return {
                    "ok": False,
                    "code": "limit_exceeded",
                    "message": f"the parser was stopped by {name}: it exceeded {cpu_limit} "
                    "or the memory limit of "
                    f"{self.settings.parse_memory_limit_bytes} bytes "
                    "(INGESTD_PARSE_MEMORY_LIMIT_BYTES)",
                }
            return {
                "ok": False,
                "code": "parser_crashed",
                "message": f"the parser crashed with {name}; the file is probably corrupt",
            }
        return {
            "ok": False,
            "code": "parser_crashed",
            "message": f"the parser exited with status {returncode}: {tail[0][:300]}",
        }

    async def _validate(self, job: ClaimedJob, lease: Lease) -> None:
        if not job.parsed_path:
            async with self.pool.acquire() as connection:
                row = await connection.fetchrow(
                    "SELECT parsed_path, parsed_sha256 FROM upload_jobs WHERE job_id = $1",
                    job.job_id,
                )
            job.parsed_path, job.parsed_sha256 = (
                row["parsed_path"],
                row["parsed_sha256"],
            )
        try:
            data = await asyncio.to_thread(self.storage.get, job.parsed_path)
        except FileNotFoundError:
            raise TransientError(
                "parsed_text_missing",
                f"parsed text {job.parsed_path} is missing from storage",
            ) from None
        except OSError as exc:
            raise TransientError(
                "storage_error",
                f"cannot read parsed text {job.parsed_path}: the blob storage is not "
                f"readable ({exc}); {_STORAGE_ADVICE}",
            ) from exc
        if parsed_sha256(data.decode("utf-8")) != job.parsed_sha256:
            raise PermanentError(
                "parsed_text_mismatch",
                f"parsed text {job.parsed_path} does not match its recorded sha256",
            )
        async with self.pool.acquire() as connection, connection.transaction():
            duplicate_of = await connection.fetchval(
                """
                SELECT document_id FROM documents
                WHERE user_id = $1 AND parsed_sha256 = $2 AND document_id <> $3
                ORDER BY created_at LIMIT 1
                """,
                job.user_id,
                job.parsed_sha256,
                job.document_id,
            )
            detail: dict[str, Any] = {"bytes": len(data)}
            if duplicate_of is not None:
                # Different bytes with the same text (a re-saved PDF, say):
                # recorded for the audit trail, and still processed so each
                # document stays searchable on its own.
                detail["same_text_as"] = str(duplicate_of)
            await jobs.advance(
                connection,
                lease,
                Status.PARSE_VALIDATED,
                keep_lease=False,
                set_columns={"parse_password": None},
                detail=detail,
            )
