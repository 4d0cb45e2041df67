"""`ingestd up` runs the services as separate processes; the CLI drives them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_serving(
    port: int, process: subprocess.Popen, limit_seconds: float = 180
) -> None:
    deadline = time.monotonic() + limit_seconds
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, "ingestd up exited early"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    pytest.fail(f"gateway on port {port} did not become healthy")


INGESTD = [sys.executable, "-c", "from ingestd.cli import main; main()"]


def run_cli(
    env: dict[str, str], *arguments: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run one ingestd command in a child process and capture its output."""
    return subprocess.run(
        [*INGESTD, *arguments],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_up_upload_search_and_ctrl_c(database_url: str, tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("gateway", "chunker", "embedder")}
    env = dict(os.environ)
    env.update(
        {
            "INGESTD_DATABASE_URL": database_url,
            "INGESTD_DATA_DIR": str(tmp_path / "data"),
            "INGESTD_SHUTDOWN_GRACE_SECONDS": "5",
            **{
                f"INGESTD_{name.upper()}_PORT": str(port)
                for name, port in ports.items()
            },
        }
    )
    up = subprocess.Popen(
        [*INGESTD, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        for port in ports.values():
            wait_serving(port, up)
        children = psutil.Process(up.pid).children(recursive=True)
        folder = tmp_path / "notes"
        (folder / "animals").mkdir(parents=True)
        document = folder / "animals" / "otters.md"
        document.write_text(
            "# Otters\n\nSea otters hold hands while they sleep so they do not drift apart.\n"
        )
        # Brackets would be rich markup if the CLI did not escape file names.
        (folder / "herons [draft].txt").write_text(
            "Herons stand still in shallow water.\n"
        )
        (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        uploaded = run_cli(env, "upload", str(folder), "--wait", timeout=300)
        assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
        # The folder's two documents were uploaded; the PNG was named and skipped.
        assert "otters.md: document" in uploaded.stdout
        assert "herons [draft].txt: document" in uploaded.stdout
        assert "skipping 1 file(s)" in uploaded.stderr
        assert "photo.png" in uploaded.stderr
        found = run_cli(env, "search", "why do otters hold hands", timeout=120)
        assert found.returncode == 0, found.stderr
        assert "otters.md" in found.stdout
        # Piped output is not cut to 80 columns, so each job's row names its
        # file whole.
        listed = run_cli(env, "jobs", timeout=60)
        assert listed.returncode == 0, listed.stderr
        rows = [line for line in listed.stdout.splitlines() if "complete" in line]
        assert len(rows) == 2
        assert any("otters.md" in row for row in rows)
        assert any("herons [draft].txt" in row for row in rows)

        documents = run_cli(env, "documents", timeout=60)
        assert documents.returncode == 0, documents.stderr
        herons = next(
            line
            for line in documents.stdout.splitlines()
            if "herons [draft].txt" in line
        )
        assert "text/plain" in herons
        herons_id = herons.split()[1]

        # A job that has not failed cannot be retried, and the error states why.
        job_id = rows[0].split()[1]
        retried = run_cli(env, "retry", job_id, timeout=60)
        assert retried.returncode == 1
        assert "FAILED_PRECONDITION" in retried.stderr

        # Without a terminal to ask on, delete wants --yes.
        unasked = run_cli(env, "delete", herons_id, timeout=60)
        assert unasked.returncode == 1
        assert "pass --yes" in unasked.stderr
        deleted = run_cli(env, "delete", herons_id, "--yes", timeout=60)
        assert deleted.returncode == 0, deleted.stderr
        assert f"deleted {herons_id}: 1 searchable chunk, 1 job" in deleted.stdout
        documents = run_cli(env, "documents", timeout=60)
        assert "herons" not in documents.stdout
        assert "otters.md" in documents.stdout

        # Text of zero-width spaces only fails to parse; retry runs it again.
        blank = tmp_path / "blank.txt"
        blank.write_text("\u200b" * 40 + "\n")
        failed = run_cli(env, "upload", str(blank), "--wait", timeout=300)
        assert failed.returncode == 1
        assert "failed_parse: unreadable_text" in " ".join(failed.stderr.split())
        failed_job = failed.stdout.split(" job ")[1].split()[0]
        retried = run_cli(env, "retry", failed_job, timeout=60)
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.strip() == f"{failed_job}: uploaded"
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output.decode(errors="replace")[-2000:]
    # Authentication is on. The first run created a key and printed where it
    # saved it and how other clients send it, and the CLI calls above used it.
    text = " ".join(output.decode(errors="replace").split())
    assert "created an admin API key" in text
    assert "authorization: Bearer KEY" in text
    key_file = tmp_path / "data" / "api-key"
    assert key_file.read_text().strip().startswith("ingestd_")
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(children) >= 3
    assert not [
        child
        for child in children
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    ]
