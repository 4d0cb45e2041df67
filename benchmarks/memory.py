"""Peak resident memory of the embedder for a small and a large document.

Each document goes through a fresh set of service processes, so each peak
belongs to one document. The peak is the embedder's ``VmHWM`` (the kernel's
high-water mark of resident memory) read once the job is complete, and the
idle figure is the same value after start-up, with the model loaded. The
documents are generated Markdown of about 100 and about 10,000 chunks.

Run: ``python -m benchmarks.memory`` (``--smoke`` for the small CI size).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from benchmarks import harness

# About 10 paragraphs of this document make one chunk of the default size
# (the smoke run's 200-chunk target gave 261 chunks with 13).
PARAGRAPHS_PER_CHUNK = 10


def generated_document(chunks: int) -> bytes:
    """A Markdown document that cuts into about the given number of chunks."""
    sections = []
    for section in range(max(1, chunks // 10)):
        paragraphs = "\n\n".join(
            f"Paragraph {n} of section {section}: replica {n % 7} renews lease "
            f"{section * 1000 + n} before it expires."
            for n in range(10 * PARAGRAPHS_PER_CHUNK)
        )
        sections.append(f"## Section {section}\n\n{paragraphs}")
    return ("# Generated document\n\n" + "\n\n".join(sections) + "\n").encode()


def high_water_mark_kib(pid: int) -> int:
    """Return a process's peak resident memory (VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


async def measure_one(
    server_url: str, data: bytes, backend: str, threads: int
) -> dict[str, Any]:
    database_url = await harness.create_database(server_url)
    with tempfile.TemporaryDirectory(prefix="ingestd-bench-") as folder:
        # The large document has more characters and chunks than the
        # default limits per document allow.
        cluster = harness.Cluster(
            database_url,
            Path(folder),
            settings={
                "INGESTD_MAX_PARSED_CHARS": "100000000",
                "INGESTD_MAX_CHUNKS_PER_DOCUMENT": "100000",
            },
        )
        try:
            await cluster.start(
                embedder={
                    "INGESTD_EMBED_BACKEND": backend,
                    "INGESTD_EMBED_THREADS": str(threads),
                }
            )
            pid = cluster.processes["embedder"].process.pid
            async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
                idle = high_water_mark_kib(pid)
                job_id = await harness.upload(channel, data, "generated.md")
                statuses = await harness.wait_terminal(
                    database_url, [job_id], poll_seconds=0.2
                )
            peak = high_water_mark_kib(pid)
        finally:
            cluster.stop()
    connection = await asyncpg.connect(database_url)
    try:
        chunks = await connection.fetchval("SELECT count(*) FROM document_chunks")
    finally:
        await connection.close()
    return {
        "status": statuses[job_id],
        "chunks": chunks,
        "idle_peak_mib": idle / 1024,
        "peak_mib": peak / 1024,
        "growth_mib": (peak - idle) / 1024,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sizes = (20, 200) if args.smoke else (100, 10_000)
    runs = []
    with harness.embedded_postgres() as server_url:
        for size in sizes:
            run = await measure_one(
                server_url, generated_document(size), args.backend, args.threads
            )
            run["target_chunks"] = size
            runs.append(run)
    failed = [run for run in runs if run["status"] != "complete"]
    if failed:
        raise SystemExit(f"a document did not complete, so no ratio: {failed}")
    small, large = runs
    ratio = large["peak_mib"] / small["peak_mib"]
    harness.print_table(
        f"Embedder peak resident memory ({args.backend} backend)",
        ["document", "chunks", "idle MiB", "peak MiB", "growth MiB"],
        [
            [
                f"about {run['target_chunks']} chunks",
                run["chunks"],
                run["idle_peak_mib"],
                run["peak_mib"],
                run["growth_mib"],
            ]
            for run in runs
        ],
    )
    print(f"\nlarge peak / small peak: {ratio:.3f}")
    return {
        "backend": args.backend,
        "threads": args.threads,
        "runs": runs,
        "peak_ratio_large_to_small": ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--threads", type=int, default=2, help="model threads")
    parser.add_argument(
        "--backend", default="onnx", choices=("onnx", "sentence-transformers")
    )
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    path = harness.write_result(
        "memory", result, smoke=args.smoke, results_dir=args.results_dir
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
