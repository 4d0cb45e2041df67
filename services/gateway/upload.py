"""UploadService: accept files, report on jobs and documents, delete them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import unicodedata
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.message import DecodeError

from ingestd.v1 import upload_service_pb2 as pb
from ingestd.v1 import upload_service_pb2_grpc as pb_grpc
from services.gateway import pagination
from services.gateway.identity import IdentityCache, IdentityUnavailableError
from services.gateway.parsing import ParseError, sniff_content_type
from shared import failpoints, ids, jobs
from shared.config import Settings
from shared.errors import DATABASE_ERRORS
from shared.grpc_server import abort, current_principal, current_user
from shared.jobs import RETRY_TARGETS, TERMINAL_STATUSES, Status
from shared.notify import JobListener, notified_job_ids
from shared.proto_convert import document_to_proto, job_to_proto, status_from_proto
from shared.storage import (
    BlobWriter,
    LocalBlobStore,
    describe_write_error,
    is_out_of_space,
    parsed_key,
    raw_key,
)

log = logging.getLogger(__name__)

SNIFF_BYTES = 8192
# Parse error codes that a repeated upload with a password may clear.
PASSWORD_ERRORS = ("encrypted_password_required", "encrypted_password_wrong")
# WatchJob re-reads the job at least this often, in case a notification was
# lost.
WATCH_POLL_SECONDS = 2.0
_T = TypeVar("_T")
MAX_FILENAME_CHARS = 255
MAX_CONTENT_TYPE_CHARS = 255
MAX_PASSWORD_CHARS = 1024
# Unicode categories removed from display names: controls (Cc), format
# characters such as bidirectional overrides and zero-width spaces (Cf),
# line and paragraph separators (Zl, Zp), surrogates (Cs) and unassigned
# or private-use code points (Cn, Co).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Cn", "Co"})


@contextlib.asynccontextmanager
async def document_lock(
    pool: asyncpg.Pool, document_id: uuid.UUID
) -> AsyncIterator[asyncpg.Connection]:
    """Hold a session advisory lock on one document and yield its connection.

    Uploads and deletes of one document run one at a time under it. The
    caller does its database work on the yielded connection, so a waiting
    caller never needs a second pooled connection.
    """
    key = str(document_id)
    async with pool.acquire() as connection:
        await connection.execute(
            "SELECT pg_advisory_lock(hashtextextended($1, 0))", key
        )
        try:
            yield connection
        finally:
            # asyncpg also releases advisory locks when the pool resets the
            # connection, so a failure here leaks no lock.
            with contextlib.suppress(*DATABASE_ERRORS):
                await connection.execute(
                    "SELECT pg_advisory_unlock(hashtextextended($1, 0))", key
                )


class UploadRejectedError(Exception):
    """A reason to end an upload call, raised while its temporary file is open.

    The handler removes the temporary file before it sends the status, so a
    client that sees the error never finds the partial upload on disk.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str,
        field_name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.field_name = field_name


def _bad_stream(message: str) -> UploadRejectedError:
    return UploadRejectedError(
        grpc.StatusCode.INVALID_ARGUMENT, message, "BAD_UPLOAD_STREAM"
    )


async def _with_idle_timeout(
    requests: AsyncIterator[pb.UploadRequest], idle_seconds: float
) -> AsyncIterator[pb.UploadRequest]:
    """Yield requests, ending the call when none arrives for idle_seconds.

    Without this, a client that opens a stream and sends nothing would hold
    its slot and its temporary file forever.
    """
    iterator = aiter(requests)
    while True:
        try:
            message = await asyncio.wait_for(anext(iterator), timeout=idle_seconds)
        except StopAsyncIteration:
            return
        except TimeoutError:
            log.warning(
                "upload stalled; ending it",
                extra={"event": "upload_idle_timeout", "idle_seconds": idle_seconds},
            )
            raise UploadRejectedError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the upload sent nothing for {idle_seconds:g} s "
                "(INGESTD_UPLOAD_IDLE_TIMEOUT_SECONDS); send the file again without pausing",
                "UPLOAD_IDLE",
            ) from None
        except DecodeError as exc:
            # Messages of a stream are decoded as they are read, so a message
            # that is not valid protobuf, or a string field that is not
            # UTF-8, surfaces here.
            raise _bad_stream(
                f"a message could not be decoded ({exc}); string fields such as "
                "metadata.filename must be valid UTF-8"
            ) from None
        yield message


def display_filename(name: str) -> str:
    """Clean a client-supplied file name for display only.

    Keeps the last path segment, applies NFC, removes control, format and
    separator characters, and shortens the name to MAX_FILENAME_CHARS
    characters, keeping the extension when it is short. The result is never
    used in a storage path and may be empty.
    """
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(
        character
        for character in name
        if unicodedata.category(character) not in _HIDDEN_CATEGORIES
    ).strip()
    if name in (".", ".."):
        return ""
    if len(name) <= MAX_FILENAME_CHARS:
        return name
    stem, dot, extension = name.rpartition(".")
    if dot and stem and len(extension) <= 16:
        return stem[: MAX_FILENAME_CHARS - len(extension) - 1] + "." + extension
    return name[:MAX_FILENAME_CHARS]


def _check_metadata_text(metadata: pb.UploadMetadata) -> None:
    """Reject metadata strings that cannot be stored as they are.

    PostgreSQL text cannot contain a NUL character, and a content type or password
    with control characters is a client bug. The file name is exempt: it is
    cleaned for display instead.
    """
    for field, value, limit in (
        ("metadata.content_type", metadata.content_type, MAX_CONTENT_TYPE_CHARS),
        ("metadata.password", metadata.password, MAX_PASSWORD_CHARS),
    ):
        if len(value) > limit:
            raise UploadRejectedError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field} has {len(value)} characters, more than the maximum of "
                f"{limit}; send a shorter value",
                "BAD_METADATA",
                field_name=field,
            )
        bad = next((char for char in value if unicodedata.category(char) == "Cc"), None)
        if bad is not None:
            displayed = "a password" if field == "metadata.password" else repr(value)
            raise UploadRejectedError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field} contains the control character U+{ord(bad):04X} in "
                f"{displayed}; send it without control characters",
                "BAD_METADATA",
                field_name=field,
            )


def declared_type_differs(declared: str, detected: str) -> bool:
    """Tell whether a declared content type names another media type than detected.

    Parameters such as "; charset=utf-8" and letter case are ignored, and
    so is an empty declaration. Markdown declared as text/x-markdown counts
    as text/markdown.
    """
    media_type = declared.split(";", 1)[0].strip().lower()
    if not media_type:
        return False
    return _MEDIA_TYPE_ALIASES.get(media_type, media_type) != detected


_MEDIA_TYPE_ALIASES = {
    "text/x-markdown": "text/markdown",
    "application/xhtml+xml": "text/html",
    "application/x-pdf": "application/pdf",
}


class UploadServicer(pb_grpc.UploadServiceServicer):
    """Implements ingestd.v1.UploadService."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        storage: LocalBlobStore,
        settings: Settings,
        identity: IdentityCache,
        listener: JobListener,
    ) -> None:
        self.pool = pool
        self.storage = storage
        self.settings = settings
        self.identity = identity
        self.listener = listener
        self._active_uploads = 0
        self._active_uploads_by_user: Counter[str] = Counter()
        self._active_watches_by_user: Counter[str] = Counter()
        self._active_watches = 0

    # Upload ---------------------------------------------------------------

    async def Upload(
        self,
        request_iterator: AsyncIterator[pb.UploadRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadResponse:
        if self._active_uploads >= self.settings.max_concurrent_uploads:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._active_uploads} uploads are in progress, the maximum "
                "(INGESTD_MAX_CONCURRENT_UPLOADS); retry in a few seconds",
                reason="TOO_MANY_UPLOADS",
            )
        user = current_user()
        user_uploads = self._active_uploads_by_user[user]
        if user_uploads >= self.settings.max_concurrent_uploads_per_user:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"user {user} has {user_uploads} uploads in progress, the maximum "
                f"of {self.settings.max_concurrent_uploads_per_user} per user "
                "(INGESTD_MAX_CONCURRENT_UPLOADS_PER_USER); wait for one to finish",
                reason="TOO_MANY_UPLOADS_FOR_USER",
            )
        self._active_uploads += 1
        self._active_uploads_by_user[user] += 1
        try:
            return await self._receive_upload(request_iterator, context)
        finally:
            self._active_uploads -= 1
            self._active_uploads_by_user[user] -= 1
            if self._active_uploads_by_user[user] <= 0:
                del self._active_uploads_by_user[user]

    async def _receive_upload(
        self,
        request_iterator: AsyncIterator[pb.UploadRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadResponse:
        user = current_user()
        try:
            identity = await self.identity.get()
        except IdentityUnavailableError as exc:
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                str(exc),
                reason="PIPELINE_UNAVAILABLE",
            )
        metadata: pb.UploadMetadata | None = None
        writer: BlobWriter | None = None
        digest = hashlib.sha256()
        size = 0
        head = bytearray()
        committed = False
        idle_seconds = self.settings.upload_idle_timeout_seconds
        try:
            async for message in _with_idle_timeout(request_iterator, idle_seconds):
                kind = message.WhichOneof("payload")
                if kind == "metadata":
                    if metadata is not None:
                        raise _bad_stream(
                            "metadata was sent twice; send it once, first"
                        )
                    metadata = message.metadata
                    _check_metadata_text(metadata)
                    await self._check_declared_size(context, metadata)
                    writer = await self._store(context, self.storage.open_writer)
                    continue
                if metadata is None or writer is None:
                    raise _bad_stream(
                        "the first message must carry metadata; send it before any chunk"
                    )
                if kind != "chunk":
                    continue
                data = message.chunk
                size += len(data)
                if size > self.settings.max_upload_bytes:
                    raise UploadRejectedError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"upload exceeds the maximum of {self.settings.max_upload_bytes} bytes "
                        "(INGESTD_MAX_UPLOAD_BYTES); split the file or raise the limit",
                        "UPLOAD_TOO_LARGE",
                    )
                digest.update(data)
                if len(head) < SNIFF_BYTES:
                    head += data[: SNIFF_BYTES - len(head)]
                await self._store(context, writer.write, data, partial=writer)
            if metadata is None or writer is None:
                raise _bad_stream("the stream was empty; send a metadata message first")
            if metadata.size_bytes and metadata.size_bytes != size:
                raise UploadRejectedError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"metadata.size_bytes is {metadata.size_bytes} but {size} bytes arrived; "
                    "the upload was cut short, send it again",
                    "SIZE_MISMATCH",
                    field_name="metadata.size_bytes",
                )
            try:
                content_type = sniff_content_type(
                    bytes(head), metadata.filename, metadata.content_type
                )
            except ParseError as exc:
                raise UploadRejectedError(
                    grpc.StatusCode.INVALID_ARGUMENT, exc.message, "UNSUPPORTED_TYPE"
                ) from exc
            raw_sha = digest.hexdigest()
            document_id = ids.document_id(user, raw_sha)
            key = raw_key(user, document_id)
            # The lock orders this upload against a DeleteDocument of the
            # same document, which would otherwise remove the file just
            # committed here after its own rows were gone.
            async with document_lock(self.pool, document_id) as connection:
                await self._store(context, writer.commit, key, partial=writer)
                committed = True
                try:
                    await failpoints.hit(
                        "upload.before_record", document_id=document_id
                    )
                    return await self._record_upload(
                        connection,
                        context,
                        user,
                        metadata,
                        content_type,
                        size,
                        raw_sha,
                        document_id,
                        key,
                        identity,
                    )
                except Exception:
                    await self._remove_unrecorded(connection, document_id, key)
                    raise
        except UploadRejectedError as rejection:
            # The temporary file goes before the status, so a client that
            # sees the error never finds it.
            if writer is not None:
                await asyncio.to_thread(writer.abort)
            await abort(
                context,
                rejection.code,
                rejection.message,
                reason=rejection.reason,
                field_name=rejection.field_name,
            )
            raise
        finally:
            if writer is not None and not committed:
                await asyncio.to_thread(writer.abort)

    async def _remove_unrecorded(
        self, connection: asyncpg.Connection, document_id: uuid.UUID, key: str
    ) -> None:
        """Delete a committed raw file whose upload failed to record its rows.

        The caller holds the document's lock, so no other upload of the same
        bytes can record the document meanwhile. A file that an earlier
        upload already recorded stays.
        """
        try:
            known = await connection.fetchval(
                "SELECT 1 FROM documents WHERE document_id = $1", document_id
            )
        except DATABASE_ERRORS:
            log.warning(
                "cannot tell whether the raw file of a failed upload is recorded; "
                "keeping it",
                extra={"event": "upload_orphan_kept", "document_id": str(document_id)},
                exc_info=True,
            )
            return
        if known is None:
            try:
                await asyncio.to_thread(self.storage.delete, key)
            except OSError:
                log.warning(
                    "cannot remove the raw file of an upload that was not recorded",
                    extra={
                        "event": "upload_orphan_kept",
                        "document_id": str(document_id),
                    },
                    exc_info=True,
                )
                return
            log.info(
                "removed the raw file of an upload that was not recorded",
                extra={
                    "event": "upload_orphan_removed",
                    "document_id": str(document_id),
                },
            )

    async def _store(
        self,
        context: grpc.aio.ServicerContext,
        function: Callable[..., _T],
        *arguments: Any,
        partial: BlobWriter | None = None,
    ) -> _T:
        """Run a blob store call in a thread, and end the RPC if the storage fails.

        On failure the partial upload is discarded first, so its temporary
        file is gone by the time the client gets the error.
        """
        try:
            return await asyncio.to_thread(function, *arguments)
        except OSError as exc:
            if partial is not None:
                await asyncio.to_thread(partial.abort)
            await self._abort_storage_error(context, exc)
            raise

    async def _abort_storage_error(
        self, context: grpc.aio.ServicerContext, exc: OSError
    ) -> None:
        full = is_out_of_space(exc)
        log.error(
            "cannot store an upload: %s",
            describe_write_error(exc),
            extra={
                "event": "upload_storage_error",
                "storage_dir": str(self.storage.root),
                "out_of_space": full,
            },
        )
        # The message leaves out the server's paths, which mean nothing to
        # the client. The log above has them for the operator.
        if full:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server's blob storage is full ({exc.strerror or exc}), so nothing was "
                "stored; upload again once an operator has freed space in the "
                "storage folder (INGESTD_STORAGE_DIR)",
                reason="STORAGE_FULL",
            )
        await abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"the server's blob storage is not writable ({exc.strerror or exc}), so nothing "
            "was stored; upload again once an operator has made the storage folder "
            "(INGESTD_STORAGE_DIR) writable",
            reason="STORAGE_UNAVAILABLE",
        )

    async def _check_declared_size(
        self, context: grpc.aio.ServicerContext, metadata: pb.UploadMetadata
    ) -> None:
        if metadata.size_bytes < 0:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata.size_bytes is {metadata.size_bytes}; use the file size, or 0 if unknown",
                reason="BAD_SIZE",
                field_name="metadata.size_bytes",
            )
        if metadata.size_bytes > self.settings.max_upload_bytes:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"file of {metadata.size_bytes} bytes exceeds the maximum of "
                f"{self.settings.max_upload_bytes} bytes (INGESTD_MAX_UPLOAD_BYTES)",
                reason="UPLOAD_TOO_LARGE",
                field_name="metadata.size_bytes",
            )

    async def _record_upload(
        self,
        connection: asyncpg.Connection,
        context: grpc.aio.ServicerContext,
        user: str,
        metadata: pb.UploadMetadata,
        content_type: str,
        size: int,
        raw_sha: str,
        document_id: uuid.UUID,
        key: str,
        identity: Any,
    ) -> pb.UploadResponse:
        job_id = ids.job_id(
            document_id,
            identity.chunker_name,
            identity.chunker_version,
            identity.embed_model,
            identity.embed_version,
        )
        declared_type = metadata.content_type[:255]
        declared_differs = declared_type_differs(declared_type, content_type)
        async with connection.transaction():
            inserted_document = await connection.fetchval(
                """
                INSERT INTO documents (document_id, user_id, filename, content_type,
                    declared_content_type, byte_size, raw_sha256, raw_path)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                ON CONFLICT DO NOTHING
                RETURNING document_id
                """,
                document_id,
                user,
                display_filename(metadata.filename),
                content_type,
                declared_type,
                size,
                raw_sha,
                key,
            )
            inserted_job = await connection.fetchval(
                """
                INSERT INTO upload_jobs (job_id, user_id, document_id, status, raw_path,
                    chunker_name, chunker_version, embed_model, embed_version,
                    max_attempts, parse_password)
                VALUES ($1, $2, $3, 'uploaded', $4, $5, $6, $7, $8, $9, $10)
                ON CONFLICT DO NOTHING
                RETURNING job_id
                """,
                job_id,
                user,
                document_id,
                key,
                identity.chunker_name,
                identity.chunker_version,
                identity.embed_model,
                identity.embed_version,
                self.settings.max_attempts,
                metadata.password or None,
            )
            if inserted_job is not None:
                await jobs.record_event(
                    connection,
                    job_id,
                    None,
                    Status.UPLOADED,
                    worker=None,
                    lease_token=None,
                    detail={
                        "action": "upload",
                        "bytes": size,
                        "content_type": content_type,
                        "declared_content_type": declared_type,
                        "declared_type_differs": declared_differs,
                    },
                )
                await jobs.notify(connection, job_id, Status.UPLOADED)
            elif metadata.password:
                await self._retry_with_password(connection, job_id, metadata.password)
            document = await connection.fetchrow(
                "SELECT * FROM documents WHERE document_id = $1", document_id
            )
            job = await connection.fetchrow(
                "SELECT * FROM upload_jobs WHERE job_id = $1", job_id
            )
        duplicate = inserted_document is None
        log.info(
            "upload stored",
            extra={
                "event": "upload_stored",
                "document_id": str(document_id),
                "job_id": str(job_id),
                "bytes": size,
                "content_type": content_type,
                "declared_content_type": declared_type,
                "declared_type_differs": declared_differs,
                "duplicate": duplicate,
            },
        )
        return pb.UploadResponse(
            document=document_to_proto(document),
            job=job_to_proto(job),
            duplicate=duplicate,
        )

    async def _retry_with_password(
        self, connection: asyncpg.Connection, job_id: uuid.UUID, password: str
    ) -> None:
        """Parse a failed encrypted PDF again when its upload is repeated with a password.

        The parse error instructs the user to upload the file again with its
        password. The bytes are the same, so the upload finds the existing
        job; when that job failed for want of the right password, it goes
        back to `uploaded` with the new password and fresh attempts.
        """
        reset = await connection.fetchval(
            """
            UPDATE upload_jobs
            SET status = 'uploaded', parse_password = $3, retry_count = 0,
                attempts = 0, run_after = now(), updated_at = now()
            WHERE job_id = $1 AND status = $2
              AND last_error->>'code' = ANY($4::text[])
            RETURNING job_id
            """,
            job_id,
            str(Status.FAILED_PARSE),
            password,
            list(PASSWORD_ERRORS),
        )
        if reset is None:
            return
        await jobs.record_event(
            connection,
            job_id,
            str(Status.FAILED_PARSE),
            str(Status.UPLOADED),
            worker=None,
            lease_token=None,
            detail={"action": "retry_with_password"},
        )
        await jobs.notify(connection, job_id, Status.UPLOADED)
        log.info(
            "failed job retried with a password",
            extra={"event": "retry_with_password", "job_id": str(job_id)},
        )

    # Jobs -----------------------------------------------------------------

    async def _parse_id(
        self, context: grpc.aio.ServicerContext, value: str, field: str
    ) -> uuid.UUID:
        try:
            return ids.parse_uuid(value, field)
        except ValueError as exc:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                str(exc),
                reason="INVALID_ID",
                field_name=field,
            )
            raise

    async def _fetch_job(
        self, context: grpc.aio.ServicerContext, job_id: str
    ) -> asyncpg.Record:
        parsed = await self._parse_id(context, job_id, "job_id")
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT * FROM upload_jobs WHERE job_id = $1 AND user_id = $2",
                parsed,
                current_user(),
            )
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"job {job_id} not found",
                reason="JOB_NOT_FOUND",
            )
        return row

    async def GetJob(
        self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetJobResponse:
        return pb.GetJobResponse(
            job=job_to_proto(await self._fetch_job(context, request.job_id))
        )

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        if self._active_watches >= self.settings.max_concurrent_watches:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._active_watches} jobs are being watched, the maximum "
                "(INGESTD_MAX_CONCURRENT_WATCHES); poll with GetJob or retry later",
                reason="TOO_MANY_WATCHES",
            )
        user = current_user()
        if (
            self._active_watches_by_user[user]
            >= self.settings.max_concurrent_watches_per_user
        ):
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"user {user} has {self._active_watches_by_user[user]} jobs watched, the "
                f"maximum of {self.settings.max_concurrent_watches_per_user} per user "
                "(INGESTD_MAX_CONCURRENT_WATCHES_PER_USER); poll with GetJob or close "
                "a watch",
                reason="TOO_MANY_WATCHES_FOR_USER",
            )
        row = await self._fetch_job(context, request.job_id)
        self._active_watches += 1
        self._active_watches_by_user[user] += 1
        try:
            async for response in self._watch(row, context):
                yield response
        finally:
            self._active_watches -= 1
            self._active_watches_by_user[user] -= 1
            if self._active_watches_by_user[user] <= 0:
                del self._active_watches_by_user[user]

    async def _watch(
        self, row: asyncpg.Record, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        changed = asyncio.Event()
        job_key = str(row["job_id"])

        def on_notification(payload: dict[str, Any] | None) -> None:
            if payload is None or job_key in notified_job_ids(payload):
                changed.set()

        unsubscribe = self.listener.subscribe(on_notification)
        try:
            last: tuple | None = None
            while True:
                changed.clear()
                snapshot = (row["status"], row["updated_at"], str(row["progress"]))
                if snapshot != last:
                    last = snapshot
                    yield pb.WatchJobResponse(job=job_to_proto(row))
                if row["status"] in TERMINAL_STATUSES:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=WATCH_POLL_SECONDS)
                async with self.pool.acquire() as connection:
                    fresh = await connection.fetchrow(
                        "SELECT * FROM upload_jobs WHERE job_id = $1", row["job_id"]
                    )
                if fresh is None:
                    await abort(
                        context,
                        grpc.StatusCode.NOT_FOUND,
                        f"job {job_key} was deleted while being watched",
                        reason="JOB_NOT_FOUND",
                    )
                row = fresh
        finally:
            unsubscribe()

    async def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        try:
            size = pagination.page_size(request.page_size)
            after = pagination.decode_token(request.page_token)
            statuses = [str(status_from_proto(value)) for value in request.statuses]
        except ValueError as exc:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"statuses: {exc}",
                reason="INVALID_ARGUMENT",
                field_name="statuses",
            )
        document_id = None
        if request.document_id:
            document_id = await self._parse_id(
                context, request.document_id, "document_id"
            )
        if request.all_users and not current_principal().is_admin:
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "all_users lists every user's jobs and needs an admin key; "
                "leave it unset to list your own",
                reason="ADMIN_KEY_REQUIRED",
                field_name="all_users",
            )
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(
                """
                SELECT * FROM upload_jobs
                WHERE ($7 OR user_id = $1)
                  AND (cardinality($2::text[]) = 0 OR status = ANY($2::text[]))
                  AND ($3::uuid IS NULL OR document_id = $3)
                  AND ($4::timestamptz IS NULL OR (created_at, job_id) < ($4, $5::uuid))
                ORDER BY created_at DESC, job_id DESC
                LIMIT $6
                """,
                current_user(),
                statuses,
                document_id,
                after[0] if after else None,
                after[1] if after else None,
                size + 1,
                request.all_users,
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode_token(rows[-1]["created_at"], rows[-1]["job_id"])
        return pb.ListJobsResponse(
            jobs=[job_to_proto(row) for row in rows], next_page_token=token
        )

    async def RetryJob(
        self, request: pb.RetryJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.RetryJobResponse:
        row = await self._fetch_job(context, request.job_id)
        status = Status(row["status"])
        target = RETRY_TARGETS.get(status)
        if target is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"job {request.job_id} is {status}; only jobs in a failed status can be retried",
                reason="JOB_NOT_FAILED",
            )
        async with self.pool.acquire() as connection, connection.transaction():
            updated = await connection.fetchrow(
                """
                UPDATE upload_jobs
                SET status = $3, retry_count = 0, attempts = 0, run_after = now(),
                    lease_token = NULL, leased_by = NULL, lease_expires_at = NULL,
                    heartbeat_at = NULL, updated_at = now()
                WHERE job_id = $1 AND status = $2
                RETURNING *
                """,
                row["job_id"],
                str(status),
                str(target),
            )
            if updated is None:
                await abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"job {request.job_id} changed status meanwhile; fetch it and try again",
                    reason="JOB_CHANGED",
                )
            await jobs.record_event(
                connection,
                row["job_id"],
                str(status),
                str(target),
                worker=None,
                lease_token=None,
                detail={"action": "retry_job"},
            )
            await jobs.notify(connection, row["job_id"], str(target))
        return pb.RetryJobResponse(job=job_to_proto(updated))

    # Documents ------------------------------------------------------------

    async def _fetch_document(
        self, context: grpc.aio.ServicerContext, document_id: str
    ) -> asyncpg.Record:
        parsed = await self._parse_id(context, document_id, "document_id")
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(
                "SELECT * FROM documents WHERE document_id = $1 AND user_id = $2",
                parsed,
                current_user(),
            )
        if row is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"document {document_id} not found",
                reason="DOCUMENT_NOT_FOUND",
            )
        return row

    async def GetDocument(
        self, request: pb.GetDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDocumentResponse:
        document = await self._fetch_document(context, request.document_id)
        async with self.pool.acquire() as connection:
            job_rows = await connection.fetch(
                "SELECT * FROM upload_jobs WHERE document_id = $1 ORDER BY created_at DESC",
                document["document_id"],
            )
        return pb.GetDocumentResponse(
            document=document_to_proto(document),
            jobs=[job_to_proto(row) for row in job_rows],
        )

    async def ListDocuments(
        self, request: pb.ListDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDocumentsResponse:
        try:
            size = pagination.page_size(request.page_size)
            after = pagination.decode_token(request.page_token)
        except ValueError as exc:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                str(exc),
                reason="INVALID_ARGUMENT",
            )
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(
                """
                SELECT * FROM documents
                WHERE user_id = $1
                  AND ($2::timestamptz IS NULL OR (created_at, document_id) < ($2, $3::uuid))
                ORDER BY created_at DESC, document_id DESC
                LIMIT $4
                """,
                current_user(),
                after[0] if after else None,
                after[1] if after else None,
                size + 1,
            )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = pagination.encode_token(
                rows[-1]["created_at"], rows[-1]["document_id"]
            )
        return pb.ListDocumentsResponse(
            documents=[document_to_proto(row) for row in rows], next_page_token=token
        )

    async def DeleteDocument(
        self, request: pb.DeleteDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDocumentResponse:
        document = await self._fetch_document(context, request.document_id)
        document_id = document["document_id"]
        user = document["user_id"]
        # Holding the document lock until the files are gone keeps an upload
        # of the same bytes from committing its file in between.
        async with document_lock(self.pool, document_id) as connection:
            async with connection.transaction():
                exists = await connection.fetchval(
                    "SELECT 1 FROM documents WHERE document_id = $1 FOR UPDATE",
                    document_id,
                )
                if exists is None:
                    await abort(
                        context,
                        grpc.StatusCode.NOT_FOUND,
                        f"document {request.document_id} not found",
                        reason="DOCUMENT_NOT_FOUND",
                    )
                # A chunk embedded by two models or versions has a row for
                # each, and counts once.
                chunks = await connection.fetchval(
                    "WITH d AS (DELETE FROM document_chunks WHERE document_id = $1 "
                    "RETURNING chunk_id) SELECT count(DISTINCT chunk_id) FROM d",
                    document_id,
                )
                job_count = await connection.fetchval(
                    "SELECT count(*) FROM upload_jobs WHERE document_id = $1",
                    document_id,
                )
                # Jobs and both buffers go with the document through ON DELETE
                # CASCADE, and a trigger on upload_jobs deletes their events.
                await connection.execute(
                    "DELETE FROM documents WHERE document_id = $1", document_id
                )
            await asyncio.to_thread(self._delete_blobs, user, document_id)
        log.info(
            "document deleted",
            extra={
                "event": "document_deleted",
                "document_id": str(document_id),
                "chunks": chunks,
                "jobs": job_count,
            },
        )
        return pb.DeleteDocumentResponse(
            document_id=str(document_id), chunks_deleted=chunks, jobs_deleted=job_count
        )

    def _delete_blobs(self, user: str, document_id: uuid.UUID) -> None:
        self.storage.delete(raw_key(user, document_id))
        self.storage.delete(parsed_key(user, document_id))
        self.storage.delete_prefix(f"archive/{user}/{document_id}")
