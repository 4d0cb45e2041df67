"""The parse stage: uploaded → parse_queued → parsed → parse_validated."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import sys
from typing import Any

from shared import failpoints, jobs
from shared.errors import PermanentError, TransientError
from shared.hashing import parsed_sha256
from shared.jobs import PARSE_STAGE, ClaimedJob, Lease, Status
from shared.storage import LocalBlobStore, parsed_key
from shared.worker import BaseWorker

log = logging.getLogger(__name__)


class ParseWorker(BaseWorker):
    """Extracts Markdown-like text from each upload in a limited child process."""

    spec = PARSE_STAGE

    def __init__(self, *, storage: LocalBlobStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage = storage
        # A child started ahead of the next document, which has imported the
        # parser and waits for its request on stdin.
        self._spare_child: asyncio.subprocess.Process | None = None

    async def drain(self, grace_seconds: float) -> None:
        await super().drain(grace_seconds)
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
        await super().run()

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
        raw_file = self.storage.path_for(job.raw_path)
        if not raw_file.is_file():
            raise PermanentError(
                "raw_file_missing",
                f"uploaded file {job.raw_path} is missing from storage; upload the document again",
            )
        result = await self._run_child(
            {
                "path": str(raw_file),
                "content_type": content_type,
                "password": job.parse_password,
                "cpu_seconds": math.ceil(self.settings.parse_timeout_seconds),
                "memory_bytes": self.settings.parse_memory_limit_bytes,
            }
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
                "storage_error", f"cannot store parsed text: {exc}"
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

    async def _remove_orphan(self, job: ClaimedJob, key: str) -> None:
        # A document deleted while it was being parsed must not leave its
        # parsed text behind.
        async with self.pool.acquire() as connection:
            exists = await connection.fetchval(
                "SELECT 1 FROM documents WHERE document_id = $1", job.document_id
            )
        if not exists:
            await asyncio.to_thread(self.storage.delete, key)

    async def _run_child(self, request: dict[str, Any]) -> dict[str, Any]:
        process = await self._take_child()
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(json.dumps(request).encode("utf-8")),
                timeout=self.settings.parse_timeout_seconds + 10,
            )
            # The next spare starts after this parse, so its imports do not
            # compete with the parse for the CPU.
            await self._start_spare()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise PermanentError(
                "limit_exceeded",
                f"parsing took longer than {self.settings.parse_timeout_seconds:g} s "
                "(INGESTD_PARSE_TIMEOUT_SECONDS); the file is too large or malformed",
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
            if -returncode in (signal.SIGXCPU, signal.SIGKILL):
                return {
                    "ok": False,
                    "code": "limit_exceeded",
                    "message": f"the parser was stopped by {name}: it exceeded the CPU "
                    "time or memory limit (INGESTD_PARSE_TIMEOUT_SECONDS, "
                    "INGESTD_PARSE_MEMORY_LIMIT_BYTES)",
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
