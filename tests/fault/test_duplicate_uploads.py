"""Concurrent uploads of the same bytes through the gateway's gRPC API."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ingestd.cli.client import call_metadata, upload_requests
from ingestd.v1 import resources_pb2
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared.config import Settings
from shared.storage import raw_key
from tests.conftest import Pipeline

pytestmark = pytest.mark.fault

CLIENTS = 10
# Guards against a hang only.
WATCH_LIMIT_SECONDS = 300
DOCUMENT = (
    b"# Duplicate uploads\n\n"
    b"Ten clients send these bytes at the same moment, and the gateway keeps "
    b"one document and one job for them.\n"
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared test settings, with room for every client's upload at once."""
    return settings.model_copy(
        update={
            "max_concurrent_uploads": CLIENTS + 6,
            "max_concurrent_uploads_per_user": CLIENTS,
        }
    )


async def requests_after_barrier(
    path: Path, barrier: asyncio.Barrier
) -> AsyncIterator[upload_pb.UploadRequest]:
    """Yield the upload messages of path, holding the bytes until every client is ready.

    Each client sends its metadata, which opens its call on the gateway, and
    then waits at the barrier. So every upload is in progress on the server
    before any of them sends its file.
    """
    messages = upload_requests(path)
    yield next(messages)
    await barrier.wait()
    for message in messages:
        yield message


async def upload_on_own_channel(
    target: str, path: Path, barrier: asyncio.Barrier, user: str | None = None
) -> upload_pb.UploadResponse:
    """Upload path over a new channel, as a separate client would."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = upload_grpc.UploadServiceStub(channel)
        return await stub.Upload(
            requests_after_barrier(path, barrier), metadata=call_metadata(user)
        )


async def wait_terminal(
    pipeline: Pipeline, job_id: str, user: str | None = None
) -> resources_pb2.Job:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    last = None
    async with asyncio.timeout(WATCH_LIMIT_SECONDS):
        async for update in stub.WatchJob(
            upload_pb.WatchJobRequest(job_id=job_id), metadata=call_metadata(user)
        ):
            last = update.job
    assert last is not None
    return last


def stored_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


async def test_same_user_duplicates_share_job(
    pipeline: Pipeline, pool, tmp_path: Path
) -> None:
    path = tmp_path / "duplicate.md"
    path.write_bytes(DOCUMENT)
    barrier = asyncio.Barrier(CLIENTS)
    responses = await asyncio.gather(
        *(
            upload_on_own_channel(pipeline.gateway_target, path, barrier)
            for _ in range(CLIENTS)
        )
    )

    document_ids = {response.document.document_id for response in responses}
    job_ids = {response.job.job_id for response in responses}
    assert len(document_ids) == 1
    assert len(job_ids) == 1
    assert [response.duplicate for response in responses].count(False) == 1
    assert [response.duplicate for response in responses].count(True) == CLIENTS - 1
    for response in responses:
        assert response.job.document_id == response.document.document_id
        assert response.document.byte_size == len(DOCUMENT)

    document_id = uuid.UUID(document_ids.pop())
    job_id = job_ids.pop()
    job = await wait_terminal(pipeline, job_id)
    assert job.status == resources_pb2.JOB_STATUS_COMPLETE, job.last_error

    async with pool.acquire() as connection:
        documents = await connection.fetch("SELECT document_id, user_id FROM documents")
        jobs = await connection.fetch("SELECT job_id, status FROM upload_jobs")
        uploads = await connection.fetchval(
            "SELECT count(*) FROM job_events WHERE detail->>'action' = 'upload'"
        )
    assert [row["document_id"] for row in documents] == [document_id]
    assert [str(row["job_id"]) for row in jobs] == [job_id]
    assert [row["status"] for row in jobs] == ["complete"]
    assert uploads == 1

    blobs = pipeline.settings.blob_dir
    user = documents[0]["user_id"]
    raw_files = stored_files(blobs / "raw")
    assert raw_files == [blobs / raw_key(user, document_id)]
    assert raw_files[0].read_bytes() == DOCUMENT
    # Every upload wrote to its own temporary file. None may be left over.
    assert stored_files(blobs / "tmp") == []


async def test_two_users_get_two_documents(
    pipeline: Pipeline, pool, tmp_path: Path
) -> None:
    path = tmp_path / "shared.md"
    path.write_bytes(DOCUMENT)
    users = ["alice", "bob"]
    barrier = asyncio.Barrier(len(users))
    responses = await asyncio.gather(
        *(
            upload_on_own_channel(pipeline.gateway_target, path, barrier, user)
            for user in users
        )
    )

    assert len({response.document.document_id for response in responses}) == 2
    assert len({response.job.job_id for response in responses}) == 2
    assert [response.duplicate for response in responses] == [False, False]
    jobs = await asyncio.gather(
        *(
            wait_terminal(pipeline, response.job.job_id, user)
            for response, user in zip(responses, users, strict=True)
        )
    )
    for job in jobs:
        assert job.status == resources_pb2.JOB_STATUS_COMPLETE, job.last_error

    async with pool.acquire() as connection:
        documents = await connection.fetch(
            "SELECT user_id, document_id, raw_sha256 FROM documents ORDER BY user_id"
        )
        job_count = await connection.fetchval("SELECT count(*) FROM upload_jobs")
    assert [row["user_id"] for row in documents] == users
    assert len({row["raw_sha256"] for row in documents}) == 1
    assert job_count == 2
    blobs = pipeline.settings.blob_dir
    assert stored_files(blobs / "raw") == [
        blobs / raw_key(row["user_id"], row["document_id"]) for row in documents
    ]
