"""Fixtures: an embedded PostgreSQL, a migrated template database cloned per
test, and the three services running in-process on loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest

import migrations
from ingestd.v1 import upload_service_pb2 as upload_pb
from services.chunker.server import build as build_chunker
from services.embedder.server import build as build_embedder
from services.gateway.server import build as build_gateway
from shared.config import Settings
from shared.db import create_pool, start_embedded_postgres
from shared.grpc_server import RunningService, Runtime, start_service

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT.parent / "shared" / "corpus"
TEMPLATE_DB = "ingestd_template"


def _with_database(url: str, name: str) -> str:
    # Embedded URLs look like postgresql://postgres:@/postgres?host=/socket/dir
    head, _, query = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(autouse=True)
def _clear_ingestd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INGESTD_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a throwaway embedded PostgreSQL for the whole session."""
    folder = Path(tempfile.mkdtemp(prefix="ingestd-test-pg-"))
    url = start_embedded_postgres(folder / "pgdata")
    yield url
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def template_url(postgres_url: str) -> str:
    """A database migrated once; each test clones it."""

    async def create() -> None:
        connection = await asyncpg.connect(postgres_url)
        try:
            await connection.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB}")
            await connection.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        finally:
            await connection.close()

    asyncio.run(create())
    url = _with_database(postgres_url, TEMPLATE_DB)
    migrations.upgrade(url)
    return url


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
        yield _with_database(postgres_url, name)
    finally:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.fixture
async def database_url(postgres_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh migrated database for one test."""
    async with cloned_database(postgres_url) as url:
        yield url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own database and blob folder, free ports."""
    return Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        gateway_port=0,
        chunker_port=0,
        embedder_port=0,
        lease_seconds=10,
        poll_interval_seconds=1,
        backoff_base_seconds=0.2,
        backoff_max_seconds=1,
        shutdown_grace_seconds=5,
        upload_idle_timeout_seconds=2,
        max_concurrent_uploads=8,
        log_format="text",
        # Most tests act as one user without keys; tests/e2e/test_auth.py
        # runs the services with authentication on.
        allow_unauthenticated=True,
    )


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test's database."""
    assert settings.database_url is not None
    pool = await create_pool(settings.database_url, settings)
    yield pool
    await pool.close()


@dataclass
class Pipeline:
    """The three services of one test, and channels to each."""

    settings: Settings
    gateway: RunningService
    chunker: RunningService
    embedder: RunningService
    gateway_channel: grpc.aio.Channel
    chunker_channel: grpc.aio.Channel
    embedder_channel: grpc.aio.Channel

    @property
    def gateway_target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"


@contextlib.asynccontextmanager
async def running_pipeline(
    settings: Settings, channel_credentials: grpc.ChannelCredentials | None = None
) -> AsyncIterator[Pipeline]:
    """Start gateway, chunker and embedder in this process; stop them on exit."""
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
    targets = [f"127.0.0.1:{service.port}" for service in (gateway, chunker, embedder)]
    if channel_credentials is None:
        channels = [grpc.aio.insecure_channel(target) for target in targets]
    else:
        channels = [
            grpc.aio.secure_channel(target, channel_credentials) for target in targets
        ]
    try:
        yield Pipeline(settings, gateway, chunker, embedder, *channels)
    finally:
        for channel in channels:
            await channel.close()
        for service in (gateway, chunker, embedder):
            await service.stop(grace_seconds=2)


@pytest.fixture
async def pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    """Gateway, chunker and embedder with their workers, on loopback ports."""
    async with running_pipeline(settings) as running:
        yield running


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """Database pool, listener and storage without any server."""
    runtime = await Runtime.open(settings)
    yield runtime
    await runtime.close()


def upload_messages(data: bytes, filename: str, chunk_size: int = 64 * 1024):
    """Yield an Upload stream: metadata first, then the bytes in chunks."""
    yield upload_pb.UploadRequest(
        metadata=upload_pb.UploadMetadata(filename=filename, size_bytes=len(data))
    )
    for start in range(0, len(data), chunk_size):
        yield upload_pb.UploadRequest(chunk=data[start : start + chunk_size])


def corpus_file(relative: str) -> Path:
    """Path of a corpus file; skips the test when the corpus is absent."""
    path = CORPUS / relative
    if not path.is_file():
        pytest.skip(
            f"corpus file {path} is absent; the corpus sits beside the checkout"
        )
    return path
