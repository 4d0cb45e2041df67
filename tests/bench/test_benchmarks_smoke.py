"""Each benchmark at its smoke size, run as its documented command.

These keep the benchmarks working; they check what each run stored and
printed, never how fast it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.bench


def run_benchmark(module: str, results_dir: Path) -> dict[str, Any]:
    """Run one benchmark module with --smoke; return its JSON result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env["HF_HUB_OFFLINE"] = "1"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            f"benchmarks.{module}",
            "--smoke",
            "--results-dir",
            str(results_dir),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, (
        f"{module} exited with {completed.returncode}:\n{completed.stderr[-3000:]}"
    )
    assert "results:" in completed.stdout
    path = results_dir / f"{module}-smoke.json"
    assert path.is_file(), f"{module} wrote no {path.name}"
    result = json.loads(path.read_text())
    assert result["smoke"] is True
    assert result["machine"]["cores"] >= 1
    return result


def test_pipeline_vs_encode_smoke(tmp_path: Path) -> None:
    result = run_benchmark("pipeline_vs_encode", tmp_path)
    bare = result["bare_encode"]
    assert bare["chunks"] > 0
    backends = [run["backend"] for run in result["pipeline"]]
    assert backends == ["onnx", "sentence-transformers"]
    for run in result["pipeline"]:
        assert run["failed_jobs"] == []
        assert run["chunks"] == bare["chunks"]
        assert run["durability"]["fsync"] == "on"
        assert run["durability"]["synchronous_commit"] == "on"
        assert run["ratio_to_bare_encode"] > 0


def test_pipeline_vs_llamaindex_smoke(tmp_path: Path) -> None:
    result = run_benchmark("pipeline_vs_llamaindex", tmp_path)
    (run,) = result["runs"]
    assert run["ingestd"]["failed_jobs"] == []
    assert run["ingestd"]["chunks"] > 0
    assert run["llamaindex"]["chunks"] > 0
    assert run["llamaindex"]["rows_stored"] == run["llamaindex"]["chunks"]
    assert result["time_ratio_llamaindex_to_ingestd"] == run["time_ratio"]
    assert run["time_ratio"] > 0


def test_queue_vs_pgqueuer_smoke(tmp_path: Path) -> None:
    result = run_benchmark("queue_vs_pgqueuer", tmp_path)
    pairs = {(run["system"], run["workers"]) for run in result["runs"]}
    assert pairs == {
        ("ingestd", 1),
        ("ingestd-transaction", 1),
        ("pgqueuer", 1),
        ("ingestd", 4),
        ("ingestd-transaction", 4),
        ("pgqueuer", 4),
    }
    for run in result["runs"]:
        assert run["jobs_not_done_after_stop"] == 0, run
    assert set(result["ratio_ingestd_to_pgqueuer"]) == {"1", "4"}
    assert set(result["ratio_ingestd_transaction_to_pgqueuer"]) == {"1", "4"}


def test_latency_smoke(tmp_path: Path) -> None:
    result = run_benchmark("latency", tmp_path)
    assert len(result["samples"]) == 2
    for sample in result["samples"]:
        assert sample["chunks"] > 0
        assert sample["model_seconds"] > 0
        assert sample["seconds"] > 0
        # Every stage left its events, so every phase was measured.
        assert set(sample["phases_ms"]) == {
            "upload",
            "parse wake-up and claim",
            "parse",
            "validate",
            "chunk wake-up and claim",
            "chunk",
            "embed wake-up and claim",
            "embed",
            "finalize",
            "complete notification received",
        }
    assert set(result["median_phases_ms"]) == set(result["samples"][0]["phases_ms"])


def test_memory_smoke(tmp_path: Path) -> None:
    result = run_benchmark("memory", tmp_path)
    small, large = result["runs"]
    assert small["status"] == "complete"
    assert large["status"] == "complete"
    assert large["chunks"] > small["chunks"] > 0
    assert result["peak_ratio_large_to_small"] > 0
