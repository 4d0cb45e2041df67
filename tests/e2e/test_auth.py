"""API keys, user isolation and admin-only calls, through the real services."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ingestd.v1 import (
    chunker_service_pb2,
    chunker_service_pb2_grpc,
    embedder_service_pb2,
    embedder_service_pb2_grpc,
    resources_pb2,
    search_service_pb2,
    search_service_pb2_grpc,
)
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from services.chunker.server import build as build_chunker
from shared import auth
from shared.config import Settings
from shared.db import connect
from shared.grpc_server import StartupError, start_service
from tests.conftest import REPO_ROOT, Pipeline, running_pipeline, upload_messages

pytestmark = pytest.mark.e2e

CODE = grpc.StatusCode
ALICE_TEXT = b"# Alice\n\nAlice keeps a private diary about the white rabbit and the tea party.\n"
BOB_TEXT = (
    b"# Bob\n\nBob writes about lighthouses, fog horns and the keepers of the coast.\n"
)


@dataclass
class Keys:
    alice: str
    bob: str
    admin: str
    bob_id: str


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def keys(settings: Settings) -> Keys:
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    try:
        _, alice = await auth.create_key(connection, "alice")
        bob_id, bob = await auth.create_key(connection, "bob")
        _, admin = await auth.create_key(connection, "ops", is_admin=True)
    finally:
        await connection.close()
    return Keys(alice, bob, admin, bob_id)


@pytest.fixture
async def secured(settings: Settings, keys: Keys) -> AsyncIterator[Pipeline]:
    locked = settings.model_copy(
        update={
            "allow_unauthenticated": False,
            "auth_cache_seconds": 0.5,
            "rate_limit": "1000/second",
        }
    )
    async with running_pipeline(locked) as running:
        yield running


async def upload_as(pipeline: Pipeline, key: str, data: bytes, name: str):
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    return await stub.Upload(upload_messages(data, name), metadata=bearer(key))


async def wait_complete(pipeline: Pipeline, key: str, job_id: str) -> resources_pb2.Job:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    last = None
    async with asyncio.timeout(180):
        async for update in stub.WatchJob(
            upload_pb.WatchJobRequest(job_id=job_id), metadata=bearer(key)
        ):
            last = update.job
    assert last is not None
    assert last.status == resources_pb2.JOB_STATUS_COMPLETE, last.last_error
    return last


async def status_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return CODE.OK


async def test_health_and_reflection_need_no_key(secured: Pipeline) -> None:
    for channel in (
        secured.gateway_channel,
        secured.chunker_channel,
        secured.embedder_channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(secured.gateway_channel)
    names = []
    async for response in reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names = [service.name for service in response.list_services_response.service]
    assert "ingestd.v1.UploadService" in names


async def test_every_call_needs_valid_key(secured: Pipeline, keys: Keys) -> None:
    uploads = upload_grpc.UploadServiceStub(secured.gateway_channel)
    search = search_service_pb2_grpc.SearchServiceStub(secured.gateway_channel)
    job_id = "00000000-0000-0000-0000-000000000001"
    unknown_key = "ingestd_0123456789ab_" + "A" * 43
    for metadata in (
        None,
        (("authorization", "Bearer not-a-key"),),
        (("authorization", keys.alice),),  # no Bearer scheme
        bearer(unknown_key),
        # A real key id with a wrong secret.
        bearer(f"ingestd_{keys.bob_id}_" + "B" * 43),
    ):
        calls = {
            "Upload": lambda m=metadata: uploads.Upload(
                upload_messages(b"text", "a.txt"), metadata=m
            ),
            "GetJob": lambda m=metadata: uploads.GetJob(
                upload_pb.GetJobRequest(job_id=job_id), metadata=m
            ),
            "WatchJob": lambda m=metadata: uploads.WatchJob(
                upload_pb.WatchJobRequest(job_id=job_id), metadata=m
            ),
            "ListJobs": lambda m=metadata: uploads.ListJobs(
                upload_pb.ListJobsRequest(), metadata=m
            ),
            "RetryJob": lambda m=metadata: uploads.RetryJob(
                upload_pb.RetryJobRequest(job_id=job_id), metadata=m
            ),
            "GetDocument": lambda m=metadata: uploads.GetDocument(
                upload_pb.GetDocumentRequest(document_id=job_id), metadata=m
            ),
            "ListDocuments": lambda m=metadata: uploads.ListDocuments(
                upload_pb.ListDocumentsRequest(), metadata=m
            ),
            "DeleteDocument": lambda m=metadata: uploads.DeleteDocument(
                upload_pb.DeleteDocumentRequest(document_id=job_id), metadata=m
            ),
            "Search": lambda m=metadata: search.Search(
                search_service_pb2.SearchRequest(query="rabbit"), metadata=m
            ),
        }
        for name, call in calls.items():
            assert await status_of(call) == CODE.UNAUTHENTICATED, (name, metadata)
    try:
        await uploads.ListJobs(
            upload_pb.ListJobsRequest(), metadata=bearer(unknown_key)
        )
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
    assert "0123456789ab" in details
    assert "A" * 43 not in details
    assert "ingestd keys create" in details


async def test_users_cannot_see_each_other(secured: Pipeline, keys: Keys) -> None:
    uploads = upload_grpc.UploadServiceStub(secured.gateway_channel)
    search = search_service_pb2_grpc.SearchServiceStub(secured.gateway_channel)
    alice_upload = await upload_as(secured, keys.alice, ALICE_TEXT, "alice.md")
    bob_upload = await upload_as(secured, keys.bob, BOB_TEXT, "bob.md")
    alice_job = await wait_complete(secured, keys.alice, alice_upload.job.job_id)
    await wait_complete(secured, keys.bob, bob_upload.job.job_id)
    job_id, document_id = alice_job.job_id, alice_job.document_id
    as_bob = bearer(keys.bob)

    calls = {
        "GetJob": lambda: uploads.GetJob(
            upload_pb.GetJobRequest(job_id=job_id), metadata=as_bob
        ),
        "WatchJob": lambda: uploads.WatchJob(
            upload_pb.WatchJobRequest(job_id=job_id), metadata=as_bob
        ),
        "RetryJob": lambda: uploads.RetryJob(
            upload_pb.RetryJobRequest(job_id=job_id), metadata=as_bob
        ),
        "GetDocument": lambda: uploads.GetDocument(
            upload_pb.GetDocumentRequest(document_id=document_id), metadata=as_bob
        ),
        "DeleteDocument": lambda: uploads.DeleteDocument(
            upload_pb.DeleteDocumentRequest(document_id=document_id), metadata=as_bob
        ),
        "Search": lambda: search.Search(
            search_service_pb2.SearchRequest(
                query="rabbit", document_ids=[document_id]
            ),
            metadata=as_bob,
        ),
    }
    for name, call in calls.items():
        assert await status_of(call) == CODE.NOT_FOUND, name

    bob_jobs = await uploads.ListJobs(upload_pb.ListJobsRequest(), metadata=as_bob)
    assert [job.user_id for job in bob_jobs.jobs] == ["bob"]
    filtered = await uploads.ListJobs(
        upload_pb.ListJobsRequest(document_id=document_id), metadata=as_bob
    )
    assert list(filtered.jobs) == []
    bob_documents = await uploads.ListDocuments(
        upload_pb.ListDocumentsRequest(), metadata=as_bob
    )
    assert [document.filename for document in bob_documents.documents] == ["bob.md"]

    # Bob's search for Alice's words finds only Bob's chunks.
    results = await search.Search(
        search_service_pb2.SearchRequest(query="Alice diary white rabbit tea party"),
        metadata=as_bob,
    )
    assert results.results
    assert {result.document_id for result in results.results} == {
        bob_upload.document.document_id
    }

    # The same bytes from Bob are his own document, not a duplicate of Alice's.
    copy = await upload_as(secured, keys.bob, ALICE_TEXT, "copy.md")
    assert copy.document.document_id != document_id
    assert not copy.duplicate

    # Alice still has her document after Bob's attempt to delete it.
    mine = await uploads.GetDocument(
        upload_pb.GetDocumentRequest(document_id=document_id),
        metadata=bearer(keys.alice),
    )
    assert mine.document.document_id == document_id


async def test_admin_only_calls(secured: Pipeline, keys: Keys) -> None:
    uploads = upload_grpc.UploadServiceStub(secured.gateway_channel)
    chunker = chunker_service_pb2_grpc.ChunkerServiceStub(secured.chunker_channel)
    embedder = embedder_service_pb2_grpc.EmbedderServiceStub(secured.embedder_channel)
    alice_upload = await upload_as(secured, keys.alice, ALICE_TEXT, "alice.md")
    await upload_as(secured, keys.bob, BOB_TEXT, "bob.md")

    for key, expected in ((keys.alice, CODE.PERMISSION_DENIED), (keys.admin, CODE.OK)):
        metadata = bearer(key)
        assert (
            await status_of(
                lambda m=metadata: chunker.GetWorkerStatus(
                    chunker_service_pb2.ChunkerServiceGetWorkerStatusRequest(),
                    metadata=m,
                )
            )
            == expected
        )
        assert (
            await status_of(
                lambda m=metadata: embedder.GetWorkerStatus(
                    embedder_service_pb2.EmbedderServiceGetWorkerStatusRequest(),
                    metadata=m,
                )
            )
            == expected
        )
        assert (
            await status_of(
                lambda m=metadata: uploads.ListJobs(
                    upload_pb.ListJobsRequest(all_users=True), metadata=m
                )
            )
            == expected
        )
    everyone = await uploads.ListJobs(
        upload_pb.ListJobsRequest(all_users=True), metadata=bearer(keys.admin)
    )
    assert {job.user_id for job in everyone.jobs} == {"alice", "bob"}

    # Discovery calls need no key, so the gateway can read versions at start.
    info = await embedder.GetModelInfo(embedder_service_pb2.GetModelInfoRequest())
    assert info.dimensions == 384

    # Only an admin key may act for another user.
    as_alice = (("x-ingestd-user", "alice"),)
    denied = await status_of(
        lambda: uploads.GetJob(
            upload_pb.GetJobRequest(job_id=alice_upload.job.job_id),
            metadata=bearer(keys.bob) + as_alice,
        )
    )
    assert denied == CODE.PERMISSION_DENIED
    job = await uploads.GetJob(
        upload_pb.GetJobRequest(job_id=alice_upload.job.job_id),
        metadata=bearer(keys.admin) + as_alice,
    )
    assert job.job.user_id == "alice"


async def test_revoked_key_stops_working(secured: Pipeline, keys: Keys) -> None:
    uploads = upload_grpc.UploadServiceStub(secured.gateway_channel)
    listed = await uploads.ListJobs(
        upload_pb.ListJobsRequest(), metadata=bearer(keys.bob)
    )
    assert list(listed.jobs) == []
    connection = await connect(secured.settings.database_url)
    try:
        assert await auth.revoke_key(connection, keys.bob_id)
        records = await auth.list_keys(connection, include_revoked=True)
    finally:
        await connection.close()
    assert all("secret" not in repr(record) for record in records)
    await asyncio.sleep(0.6)
    code = await status_of(
        lambda: uploads.ListJobs(upload_pb.ListJobsRequest(), metadata=bearer(keys.bob))
    )
    assert code == CODE.UNAUTHENTICATED


async def test_rate_limit_per_key(settings: Settings, keys: Keys) -> None:
    limited = settings.model_copy(
        update={"allow_unauthenticated": False, "rate_limit": "5/minute"}
    )
    async with running_pipeline(limited) as running:
        uploads = upload_grpc.UploadServiceStub(running.gateway_channel)
        for _ in range(5):
            await uploads.ListJobs(
                upload_pb.ListJobsRequest(), metadata=bearer(keys.alice)
            )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await uploads.ListJobs(
                upload_pb.ListJobsRequest(), metadata=bearer(keys.alice)
            )
        # Another key has its own allowance.
        await uploads.ListJobs(upload_pb.ListJobsRequest(), metadata=bearer(keys.bob))
    assert raised.value.code() == CODE.RESOURCE_EXHAUSTED
    assert "INGESTD_RATE_LIMIT" in raised.value.details()
    assert "5 per 1 minute" in raised.value.details()


async def test_start_without_keys_fails(settings: Settings) -> None:
    locked = settings.model_copy(update={"allow_unauthenticated": False})
    with pytest.raises(StartupError) as raised:
        await start_service("chunker", 0, build_chunker, settings=locked)
    assert "ingestd keys create" in str(raised.value)
    assert "INGESTD_ALLOW_UNAUTHENTICATED" in str(raised.value)

    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env.update(
        {
            "INGESTD_DATABASE_URL": settings.database_url or "",
            "INGESTD_DATA_DIR": str(settings.data_dir),
            "INGESTD_CHUNKER_PORT": "0",
            "INGESTD_LOG_FORMAT": "text",
        }
    )
    finished = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.chunker"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 2
    assert "ingestd keys create" in finished.stderr
    assert "Traceback" not in finished.stderr
