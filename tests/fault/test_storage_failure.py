"""Blob storage that fills up or stops being writable fails uploads and parses cleanly.

Two faults stand in for real storage trouble, because the tests run as root
and chmod does not stop root from writing:

- A full disk: a soft RLIMIT_FSIZE on the gateway process. CPython ignores
  SIGXFSZ, so a write past the limit fails with EFBIG ("File too large"),
  as a write to a full disk fails with ENOSPC. The limit sits above the
  size of the gateway's log file, which the same process appends to.
- An unwritable folder: a regular file in place of the blob folder or its
  raw/ folder, so every path below it fails with ENOTDIR.

An upload must fail with a status that names the problem and leave no rows
and no partial file behind. The parse stage must retry, then fail the job
in failed_parse with a readable error while the gateway keeps serving, and
RetryJob must complete the job once the storage works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import psutil
import pytest
from google.rpc import error_details_pb2, status_pb2

from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared.config import Settings
from shared.db import connect
from tests.fault.conftest import (
    SERVING,
    Cluster,
    ServiceProcess,
    assert_invariants,
    document_text,
    events_of,
    health_status,
    upload,
    wait_for,
)

pytestmark = pytest.mark.fault

# Room left above the gateway's log file when the file size limit is set.
# The gateway logs at WARNING in these tests, so its log grows by a few
# hundred bytes per retry and stays below the limit.
GATEWAY_LOG_LEVEL = "WARNING"
LOG_HEADROOM_BYTES = 16 * 1024
# About 44 KB of text: larger than any limit the tests set, yet quick to embed.
LARGE_PARAGRAPHS = 370
PARSE_RETRIES = 2
# Long enough for the test to break the storage while the parse waits.
PARSE_PAUSE_SECONDS = 3


@contextlib.contextmanager
def file_size_limit(process: ServiceProcess) -> Iterator[int]:
    """Set a soft RLIMIT_FSIZE that the process's log file stays under but a
    large upload exceeds, and restore the old limit on exit."""
    limit = process.log_path.stat().st_size + LOG_HEADROOM_BYTES
    assert limit < len(large_document()), (
        f"the large document fits under the file size limit of {limit} bytes"
    )
    target = psutil.Process(process.pid)
    soft, hard = target.rlimit(psutil.RLIMIT_FSIZE)
    target.rlimit(psutil.RLIMIT_FSIZE, (limit, hard))
    try:
        yield limit
    finally:
        target.rlimit(psutil.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def folder_replaced_by_file(folder: Path) -> Iterator[None]:
    """Put a regular file where folder was, and restore the folder on exit."""
    aside = folder.with_name(folder.name + ".aside")
    if folder.exists():
        folder.rename(aside)
    folder.write_text("a file where the blob store expects a folder\n")
    try:
        yield
    finally:
        folder.unlink()
        if aside.exists():
            aside.rename(folder)


def large_document() -> bytes:
    return document_text(9000, paragraphs=LARGE_PARAGRAPHS)


def stored_files(blob_dir: Path) -> list[str]:
    """Return the paths of the files in the blob store, relative to its root."""
    return sorted(
        str(path.relative_to(blob_dir))
        for path in blob_dir.rglob("*")
        if path.is_file()
    )


def parsed_file(blob_dir: Path, job: asyncpg.Record) -> Path:
    return blob_dir / "parsed" / job["user_id"] / f"{job['document_id']}.md"


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """Return the ErrorInfo reason in an error's status details, if any."""
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        for detail in status_pb2.Status.FromString(value).details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason
    return None


async def assert_serving(process: ServiceProcess) -> None:
    """Assert that the original process is still running and SERVING."""
    assert process.alive(), f"{process.name} exited:\n{process.log_tail()}"
    assert await health_status(process.port) == SERVING


# count_rows of a database in which no upload was recorded.
NO_ROWS = {"documents": 0, "upload_jobs": 0, "job_events": 0}


async def count_rows(connection: asyncpg.Connection) -> dict[str, int]:
    return {
        table: await connection.fetchval(f"SELECT count(*) FROM {table}")
        for table in ("documents", "upload_jobs", "job_events")
    }


def partial_uploads(blob_dir: Path) -> list[Path]:
    """Return the temporary files of uploads and writes in progress."""
    return list((blob_dir / "tmp").glob("*.part"))


async def wait_for_partial_upload(blob_dir: Path, limit_seconds: float = 10) -> None:
    deadline = time.monotonic() + limit_seconds
    while not partial_uploads(blob_dir):
        assert time.monotonic() < deadline, f"no temporary file appeared in {blob_dir}"
        await asyncio.sleep(0.05)


async def test_upload_storage_failures(cluster: Cluster, settings: Settings) -> None:
    gateway, _chunker, _embedder = await cluster.start_all(
        gateway={"log_level": GATEWAY_LOG_LEVEL}
    )
    blob_dir = settings.blob_dir
    large = large_document()
    small = document_text(9001, paragraphs=4)
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    try:
        async with cluster.channel() as channel:
            stub = upload_grpc.UploadServiceStub(channel)

            # A full disk: the write fails part of the way through the upload's bytes.
            with file_size_limit(gateway), pytest.raises(grpc.aio.AioRpcError) as full:
                await upload(channel, large, "large.md")
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(full.value) == "STORAGE_FULL"
            assert "storage is full" in full.value.details()
            assert "File too large" in full.value.details()
            assert "upload again" in full.value.details()
            assert await count_rows(connection) == NO_ROWS
            assert stored_files(blob_dir) == []
            await assert_serving(gateway)

            # An unwritable folder: raw/ turns into a file halfway through.
            raw = blob_dir / "raw"
            half = len(small) // 2
            breakage = contextlib.ExitStack()

            async def requests() -> AsyncIterator[upload_pb.UploadRequest]:
                yield upload_pb.UploadRequest(
                    metadata=upload_pb.UploadMetadata(
                        filename="small.md", size_bytes=len(small)
                    )
                )
                yield upload_pb.UploadRequest(chunk=small[:half])
                # The gateway has opened its temporary file: break raw/ now.
                await wait_for_partial_upload(blob_dir)
                breakage.enter_context(folder_replaced_by_file(raw))
                yield upload_pb.UploadRequest(chunk=small[half:])

            with breakage:
                with pytest.raises(grpc.aio.AioRpcError) as unwritable:
                    await stub.Upload(requests(), timeout=60)
                assert raw.is_file(), "the upload ended before raw/ was replaced"
                assert stored_files(blob_dir) == ["raw"]
            assert unwritable.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(unwritable.value) == "STORAGE_UNAVAILABLE"
            assert "not writable" in unwritable.value.details()
            assert "Not a directory" in unwritable.value.details()
            assert "upload again" in unwritable.value.details()
            assert await count_rows(connection) == NO_ROWS
            assert stored_files(blob_dir) == []
            await assert_serving(gateway)

            # With the storage fixed, the same uploads go through.
            job_ids = [
                (await upload(channel, data, name)).job.job_id
                for data, name in ((large, "large.md"), (small, "small.md"))
            ]
        await wait_for(
            connection,
            job_ids,
            lambda row: row["status"] == "complete",
            limit_seconds=120,
            description="complete",
        )
        report = await assert_invariants(connection)
    finally:
        await connection.close()
    assert report.complete_jobs == 2
    await assert_serving(gateway)


async def test_unrecorded_upload_leaves_no_raw_file(
    cluster: Cluster, settings: Settings
) -> None:
    # Writing the rows fails after the raw file is in place. No API call can
    # find or delete a file without rows, so the gateway removes it.
    gateway, _chunker, _embedder = await cluster.start_all(
        gateway={"failpoints": "upload.before_record=raise"}
    )
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    try:
        async with cluster.channel() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await upload(channel, document_text(9002, paragraphs=4), "doc.md")
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert gateway.events("upload_orphan_removed")
        assert await count_rows(connection) == NO_ROWS
    finally:
        await connection.close()
    assert stored_files(settings.blob_dir) == []
    await assert_serving(gateway)


async def wait_for_failpoint(
    process: ServiceProcess, document_id: str, limit_seconds: float = 60
) -> None:
    """Wait until the process logs that a failpoint fired for the document."""
    deadline = time.monotonic() + limit_seconds
    while not any(
        record.get("document_id") == document_id
        for record in process.events("failpoint")
    ):
        assert time.monotonic() < deadline, (
            f"no failpoint fired for {document_id}:\n{process.log_tail()}"
        )
        await asyncio.sleep(0.05)


async def fail_parse_mid_store(
    cluster: Cluster,
    connection: asyncpg.Connection,
    gateway: ServiceProcess,
    data: bytes,
    break_storage: contextlib.AbstractContextManager,
) -> asyncpg.Record:
    """Upload data, break the storage while the parse waits, and wait for failed_parse."""
    async with cluster.channel() as channel:
        response = await upload(channel, data, "doc.md")
    job_id = response.job.job_id
    await wait_for_failpoint(gateway, response.document.document_id)
    with break_storage:
        rows = await wait_for(
            connection,
            [job_id],
            lambda row: row["status"] in ("failed_parse", "complete"),
            limit_seconds=90,
            description="failed_parse",
        )
    return rows[0]


async def assert_clean_storage_failure(
    connection: asyncpg.Connection, job: asyncpg.Record, blob_dir: Path
) -> None:
    """Assert that the job retried on storage_error, then failed with a readable error."""
    assert job["status"] == "failed_parse"
    assert job["lease_token"] is None
    error = job["last_error"]
    assert error["code"] == "storage_error"
    assert error["stage"] == "parse"
    assert f"gave up after {PARSE_RETRIES} retries" in error["message"]
    assert "RetryJob" in error["message"]
    events = await events_of(connection, str(job["job_id"]))
    retries = [event for event in events if event["detail"].get("action") == "retry"]
    assert [event["detail"]["code"] for event in retries] == [
        "storage_error"
    ] * PARSE_RETRIES
    assert events[-1]["detail"] == {"action": "fail", "code": "storage_error"}
    assert partial_uploads(blob_dir) == []
    assert not parsed_file(blob_dir, job).exists()


async def retry_job(cluster: Cluster, job_id: str) -> None:
    async with cluster.channel() as channel:
        stub = upload_grpc.UploadServiceStub(channel)
        response = await stub.RetryJob(upload_pb.RetryJobRequest(job_id=job_id))
    assert response.job.job_id == job_id


async def test_parse_storage_failures(cluster: Cluster, settings: Settings) -> None:
    gateway, _chunker, _embedder = await cluster.start_all(
        gateway={
            "log_level": GATEWAY_LOG_LEVEL,
            "max_retries": PARSE_RETRIES,
            "failpoints": f"parse.before_store=sleep({PARSE_PAUSE_SECONDS})",
        }
    )
    blob_dir = settings.blob_dir
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    try:
        # An unwritable folder: the whole blob folder turns into a file
        # during the parse. The first attempt cannot store the parsed text,
        # and the retries cannot read the upload either.
        unwritable = await fail_parse_mid_store(
            cluster,
            connection,
            gateway,
            document_text(9100, paragraphs=4),
            folder_replaced_by_file(blob_dir),
        )
        await assert_clean_storage_failure(connection, unwritable, blob_dir)
        assert "Not a directory" in unwritable["last_error"]["message"]
        reasons = [
            record["reason"]
            for record in gateway.events("job_retry")
            if record["job_id"] == str(unwritable["job_id"])
        ]
        assert len(reasons) == PARSE_RETRIES
        assert "cannot store parsed text" in reasons[0]
        assert "not writable" in reasons[0]
        assert "cannot read uploaded file" in reasons[1]
        assert "not readable" in reasons[1]
        await assert_serving(gateway)

        # A full disk: the parsed text no longer fits.
        full = await fail_parse_mid_store(
            cluster, connection, gateway, large_document(), file_size_limit(gateway)
        )
        await assert_clean_storage_failure(connection, full, blob_dir)
        assert "storage is full" in full["last_error"]["message"]
        assert "File too large" in full["last_error"]["message"]
        await assert_serving(gateway)

        # With the storage fixed, RetryJob completes both jobs.
        job_ids = [str(unwritable["job_id"]), str(full["job_id"])]
        for job_id in job_ids:
            await retry_job(cluster, job_id)
        await wait_for(
            connection,
            job_ids,
            lambda row: row["status"] == "complete",
            limit_seconds=120,
            description="complete",
        )
        report = await assert_invariants(connection)
    finally:
        await connection.close()
    assert report.complete_jobs == 2
    await assert_serving(gateway)
