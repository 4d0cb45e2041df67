"""Plot backend throughput per batch size from a pipeline_vs_encode --sweep result.

Run: ``python -m benchmarks.plot`` after ``python -m benchmarks.pipeline_vs_encode
--sweep-only``; it writes docs/benchmarks-throughput.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import harness

DEFAULT_OUTPUT = harness.REPO_ROOT / "docs" / "benchmarks-throughput.png"


def plot(result_path: Path, output: Path) -> None:
    """Draw chunks per second against batch size, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(result_path.read_text())
    if "sweep" not in result:
        raise SystemExit(
            f"{result_path} has no sweep; run python -m benchmarks.pipeline_vs_encode --sweep"
        )
    rows = result["sweep"]["rows"]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for backend in sorted({row["backend"] for row in rows}):
        points = sorted(
            (row["batch_size"], row["chunks_per_second"])
            for row in rows
            if row["backend"] == backend
        )
        axes.plot(
            [size for size, _ in points],
            [rate for _, rate in points],
            marker="o",
            label=backend,
        )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size (chunks per backend call)")
    axes.set_ylabel("chunks per second")
    axes.set_ylim(bottom=0)
    machine = result["machine"]
    axes.set_title(
        f"all-MiniLM-L6-v2, {result['sweep']['chunks']} corpus chunks, "
        f"{result['threads']} threads, {machine['cores']} cores"
    )
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)


def newest_sweep() -> Path:
    """Return the newer of the two result files that can hold a sweep.

    ``--sweep-only`` writes backend_sweep.json and ``--sweep`` writes the
    sweep into pipeline_vs_encode.json; the plot shows the latest one.
    """
    candidates = []
    for name in ("backend_sweep.json", "pipeline_vs_encode.json"):
        path = harness.RESULTS_DIR / name
        if path.is_file() and "sweep" in json.loads(path.read_text()):
            candidates.append(path)
    if not candidates:
        raise SystemExit(
            f"no sweep in {harness.RESULTS_DIR}; run "
            "python -m benchmarks.pipeline_vs_encode --sweep"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--result",
        type=Path,
        default=None,
        help="pipeline_vs_encode result with a sweep (--sweep or --sweep-only) "
        "[default: the newer of the two in benchmarks/results]",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write"
    )
    args = parser.parse_args()
    plot(args.result or newest_sweep(), args.output)
    print(f"plot: {args.output}")


if __name__ == "__main__":
    main()
