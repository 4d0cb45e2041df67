"""The committed ingestd.v1 modules match the .proto files, and buf lint passes."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "generate_protos.py"),
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "ingestd" / "v1"
    committed = REPO_ROOT / "ingestd" / "v1"
    names = sorted(path.name for path in fresh.iterdir() if path.is_file())
    committed_names = sorted(
        path.name for path in committed.iterdir() if path.is_file()
    )
    assert names == committed_names, "run `python scripts/generate_protos.py`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert mismatch == [], (
        f"stale generated files {mismatch}: run `python scripts/generate_protos.py`"
    )
    assert errors == []


def test_generated_code_imports_by_package_path() -> None:
    from ingestd.v1 import upload_service_pb2, upload_service_pb2_grpc

    assert upload_service_pb2.DESCRIPTOR.package == "ingestd.v1"
    assert hasattr(upload_service_pb2_grpc, "UploadServiceStub")


def test_buf_lint_passes() -> None:
    buf = shutil.which("buf")
    if buf is None:
        pytest.fail("the buf CLI is missing; install the dev extra (buf-bin)")
    result = subprocess.run(
        [buf, "lint"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
