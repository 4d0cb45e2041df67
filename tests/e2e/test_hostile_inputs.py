"""Hostile inputs built by the tests, through the whole pipeline.

Each test sends real bytes through the gateway's gRPC API to the in-process
services and checks the job's final status and error, the stored chunks, or
the gRPC status of a rejected upload. Tests that need other limits pass them
to the ``settings`` fixture with indirect parametrization.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import pytest

from ingestd.v1 import resources_pb2
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared.config import Settings
from shared.storage import raw_key
from tests.conftest import REPO_ROOT, Pipeline, corpus_file, running_pipeline
from tests.e2e.harness import (
    chunk_text_problems,
    model_tokenizer,
    upload,
    user_metadata,
    wait_terminal,
)
from tests.pdfs import PdfPageSpec, build_pdf, replacement_cmap

pytestmark = pytest.mark.e2e

COMPLETE = resources_pb2.JOB_STATUS_COMPLETE
FAILED_PARSE = resources_pb2.JOB_STATUS_FAILED_PARSE
FAILED_CHUNKING = resources_pb2.JOB_STATUS_FAILED_CHUNKING
FAILED_EMBEDDING = resources_pb2.JOB_STATUS_FAILED_EMBEDDING


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The shared test settings, updated with the test's indirect parameter."""
    return settings.model_copy(update=getattr(request, "param", {}))


async def chunk_texts(pool: asyncpg.Pool, job: resources_pb2.Job) -> list[str]:
    async with pool.acquire() as connection:
        rows = await connection.fetch(
            "SELECT text FROM document_chunks WHERE job_id = $1 ORDER BY chunk_ord",
            uuid.UUID(job.job_id),
        )
    return [row["text"] for row in rows]


async def ingest(pipeline: Pipeline, data: bytes, filename: str) -> resources_pb2.Job:
    response = await upload(pipeline, data, filename)
    return await wait_terminal(pipeline, response.job.job_id)


def assert_valid_chunks(texts: list[str], max_chars: int = 4096) -> None:
    tokenizer = model_tokenizer()
    for ordinal, text in enumerate(texts):
        problems = chunk_text_problems(text, tokenizer, 256)
        assert not problems, f"chunk {ordinal}: {problems}"
        assert len(text) <= max_chars


# Unreadable text.


async def test_replacement_font_pdf_unreadable(pipeline: Pipeline) -> None:
    lines = tuple(
        f"Line {n} of a report whose font has no usable map." for n in range(20)
    )
    data = build_pdf([PdfPageSpec(lines=lines)], to_unicode=replacement_cmap())
    job = await ingest(pipeline, data, "garbled-font.pdf")
    assert job.status == FAILED_PARSE
    assert job.last_error.code == "unreadable_text"
    assert "U+FFFD" in job.last_error.message
    assert "OCR" in job.last_error.message


async def test_cid_placeholder_pdf_unreadable(pipeline: Pipeline) -> None:
    rng = random.Random(7)
    lines = tuple(
        "".join(f"(cid:{rng.randrange(1, 300)})" for _ in range(8)) for _ in range(30)
    )
    data = build_pdf([PdfPageSpec(lines=lines)])
    job = await ingest(pipeline, data, "cid-placeholders.pdf")
    assert job.status == FAILED_PARSE
    assert job.last_error.code == "unreadable_text"
    assert "(cid:N)" in job.last_error.message


async def test_pdf_with_few_placeholders_completes(pipeline: Pipeline, pool) -> None:
    lines = tuple(f"Paragraph {n} of readable text about harbours." for n in range(10))
    data = build_pdf([PdfPageSpec(lines=(*lines, "One stray (cid:4) token."))])
    job = await ingest(pipeline, data, "mostly-readable.pdf")
    assert job.status == COMPLETE, job.last_error.message
    assert_valid_chunks(await chunk_texts(pool, job))


# Text shapes that stress the chunker.


async def test_unterminated_code_fence_completes(pipeline: Pipeline, pool) -> None:
    code = "\n".join(f"    value_{n} = compute({n}) * {n}" for n in range(400))
    text = f"# Setup\n\nRun this:\n\n```python\ndef main():\n{code}\n"
    job = await ingest(pipeline, text.encode(), "open-fence.md")
    assert job.status == COMPLETE, job.last_error.message
    texts = await chunk_texts(pool, job)
    assert len(texts) > 1
    assert_valid_chunks(texts)
    assert "value_399" in texts[-1]


async def test_table_of_thousands_rows(pipeline: Pipeline, pool) -> None:
    rows = "\n".join(f"| {n} | item {n} | {n * 3.5:.1f} |" for n in range(2000))
    text = f"# Inventory\n\n| id | name | price |\n|---|---|---|\n{rows}\n"
    job = await ingest(pipeline, text.encode(), "table.md")
    assert job.status == COMPLETE, job.last_error.message
    texts = await chunk_texts(pool, job)
    assert len(texts) > 10
    assert_valid_chunks(texts)
    assert "| 1999 | item 1999 |" in texts[-1]


async def test_no_whitespace_50k_chars(pipeline: Pipeline, pool) -> None:
    rng = random.Random(11)
    text = "".join(
        rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(50_000)
    )
    job = await ingest(pipeline, text.encode(), "one-word.txt")
    assert job.status == COMPLETE, job.last_error.message
    texts = await chunk_texts(pool, job)
    assert_valid_chunks(texts, max_chars=pipeline.settings.chunk_max_chars)
    assert "".join(texts) == text


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("😀🎉🔥👍🏽 " * 3000 + "👨‍👩‍👧‍👦" * 500, id="emoji"),
        pytest.param("中文文本没有空格。" * 1500, id="cjk"),
    ],
)
async def test_single_script_text_completes(
    pipeline: Pipeline, pool, text: str
) -> None:
    job = await ingest(pipeline, text.encode("utf-8"), "script.txt")
    assert job.status == COMPLETE, job.last_error.message
    texts = await chunk_texts(pool, job)
    assert len(texts) > 1
    assert_valid_chunks(texts)


# Limits.


@pytest.mark.parametrize("settings", [{"max_pages": 3}], indirect=True)
async def test_pdf_over_max_pages_fails(pipeline: Pipeline) -> None:
    pages = [PdfPageSpec(lines=(f"Page {n}",)) for n in range(5)]
    job = await ingest(pipeline, build_pdf(pages), "five-pages.pdf")
    assert job.status == FAILED_PARSE
    assert job.last_error.code == "limit_exceeded"
    assert "5 pages" in job.last_error.message
    assert "maximum of 3" in job.last_error.message
    assert "INGESTD_MAX_PAGES" in job.last_error.message


@pytest.mark.parametrize("settings", [{"max_pages": 100}], indirect=True)
async def test_corpus_book_over_max_pages(pipeline: Pipeline) -> None:
    data = corpus_file("pdf/pj_freeculture.pdf").read_bytes()
    job = await ingest(pipeline, data, "freeculture.pdf")
    assert job.status == FAILED_PARSE
    assert job.last_error.code == "limit_exceeded"
    assert "352 pages" in job.last_error.message


@pytest.mark.parametrize("settings", [{"max_parsed_chars": 1000}], indirect=True)
@pytest.mark.parametrize(
    ("filename", "make"),
    [
        ("long.txt", lambda: ("A sentence of plain text. " * 100).encode()),
        (
            "long.pdf",
            lambda: build_pdf([PdfPageSpec(lines=("x" * 60,) * 10) for _ in range(3)]),
        ),
    ],
)
async def test_text_over_max_chars_fails(
    pipeline: Pipeline, filename: str, make: Any
) -> None:
    job = await ingest(pipeline, make(), filename)
    assert job.status == FAILED_PARSE
    assert job.last_error.code == "limit_exceeded"
    assert "maximum of 1000" in job.last_error.message
    assert "INGESTD_MAX_PARSED_CHARS" in job.last_error.message


@pytest.mark.parametrize("settings", [{"max_chunks_per_document": 3}], indirect=True)
async def test_document_over_max_chunks_fails(pipeline: Pipeline, pool) -> None:
    text = "\n\n".join(
        f"Paragraph {n}. " + "Words of filler text. " * 60 for n in range(10)
    )
    job = await ingest(pipeline, text.encode(), "many-chunks.txt")
    assert job.status == FAILED_CHUNKING
    assert job.last_error.code == "limit_exceeded"
    assert "maximum of 3" in job.last_error.message
    assert "INGESTD_MAX_CHUNKS_PER_DOCUMENT" in job.last_error.message
    async with pool.acquire() as connection:
        buffered = await connection.fetchval(
            "SELECT count(*) FROM document_chunk_buffer WHERE document_id = $1",
            uuid.UUID(job.document_id),
        )
    assert buffered == 0


@pytest.mark.parametrize("settings", [{"max_upload_bytes": 100_000}], indirect=True)
async def test_upload_over_size_stops_stream(pipeline: Pipeline, pool) -> None:
    sent = 0

    def oversized() -> Iterator[upload_pb.UploadRequest]:
        nonlocal sent
        yield upload_pb.UploadRequest(
            metadata=upload_pb.UploadMetadata(filename="huge.txt")
        )
        for _ in range(1000):
            sent += 1
            yield upload_pb.UploadRequest(chunk=b"x" * 65536)

    def call() -> grpc.RpcError:
        # The blocking client, in a thread: when a server ends a client stream
        # early, grpcio's asyncio client can report its own INTERNAL "Internal
        # error from Core" for the write that raced the status, in place of
        # the server's status. The blocking client reports the server's.
        with grpc.insecure_channel(pipeline.gateway_target) as channel:
            stub = upload_grpc.UploadServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Upload(oversized(), timeout=60)
        return error.value

    error = await asyncio.to_thread(call)
    details = error.details()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "100000 bytes" in details
    assert "INGESTD_MAX_UPLOAD_BYTES" in details
    assert sent < 1000
    assert not list((pipeline.settings.blob_dir / "tmp").glob("*.part"))
    assert not (pipeline.settings.blob_dir / "raw").exists()
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM documents") == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("content_type", "text/plain\x00"),
        ("content_type", "text/" + "x" * 300),
        ("password", "ab\x00cd"),
        ("password", "p" * 2000),
    ],
)
async def test_bad_metadata_text_rejected(
    pipeline: Pipeline, pool, field: str, value: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await upload(pipeline, b"# Title\n\nText.\n", "doc.md", **{field: value})

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"metadata.{field}" in error.value.details()
    assert "ab\x00cd" not in error.value.details()
    assert not (pipeline.settings.blob_dir / "raw").exists()
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM documents") == 0


@pytest.mark.parametrize(
    "settings",
    [{"max_concurrent_uploads_per_user": 2, "upload_idle_timeout_seconds": 30}],
    indirect=True,
)
async def test_per_user_upload_limit(pipeline: Pipeline) -> None:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    release = asyncio.Event()

    async def held(name: str):
        yield upload_pb.UploadRequest(metadata=upload_pb.UploadMetadata(filename=name))
        await release.wait()
        yield upload_pb.UploadRequest(chunk=f"held upload {name}\n".encode())

    calls = [
        asyncio.ensure_future(
            stub.Upload(held(f"held{n}.txt"), metadata=user_metadata("alice"))
        )
        for n in range(2)
    ]
    await asyncio.sleep(0.5)
    with pytest.raises(grpc.aio.AioRpcError) as extra:
        await upload(pipeline, b"a third upload at once\n", "third.txt", user="alice")
    other = await upload(
        pipeline, b"bob is not limited by alice\n", "bob.txt", user="bob"
    )
    release.set()
    finished = await asyncio.gather(*calls)

    assert extra.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "INGESTD_MAX_CONCURRENT_UPLOADS_PER_USER" in extra.value.details()
    assert "alice" in extra.value.details()
    assert other.job.job_id
    assert all(response.job.job_id for response in finished)
    after = await upload(
        pipeline, b"alice again, once the others ended\n", "a.txt", user="alice"
    )
    assert after.job.job_id


@pytest.mark.parametrize(
    "settings",
    [{"parse_wall_timeout_seconds": 60, "max_concurrent_watches_per_user": 2}],
    indirect=True,
)
async def test_per_user_watch_limit(pipeline: Pipeline, tmp_path: Path) -> None:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    watcher = [("x-ingestd-user", "watcher")]
    # A parse child stopped with SIGSTOP keeps its job from finishing.
    pages = [PdfPageSpec(lines=(f"Page {n}.",)) for n in range(300)]
    stuck = await upload(pipeline, build_pdf(pages), "stuck.pdf", user="watcher")
    child = await stop_parse_child()
    request = upload_pb.WatchJobRequest(job_id=stuck.job.job_id)
    held = [stub.WatchJob(request, metadata=watcher) for _ in range(2)]
    try:
        for call in held:
            await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as extra:
            async for _ in stub.WatchJob(request, metadata=watcher):
                pass
        other = await upload(pipeline, b"# Other\n\nWatched.\n", "o.md", user="other")
        other_job = await wait_terminal(pipeline, other.job.job_id, user="other")

        # The CLI falls back to polling GetJob when it cannot watch.
        document = tmp_path / "polled.md"
        document.write_text("# Polled\n\nThe CLI waits without a watch.\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env["INGESTD_DATA_DIR"] = str(tmp_path / "cli")
        completed = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "ingestd.cli",
                "--gateway",
                pipeline.gateway_target,
                "--user",
                "watcher",
                "upload",
                "--wait",
                str(document),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        for call in held:
            call.cancel()
        child.kill()

    assert extra.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "INGESTD_MAX_CONCURRENT_WATCHES_PER_USER" in extra.value.details()
    assert "watcher" in extra.value.details()
    assert other_job.status == COMPLETE
    assert completed.returncode == 0, completed.stderr
    assert "complete" in completed.stdout
    assert "Traceback" not in completed.stderr


def _length_delimited(field: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([field << 3 | 2, len(payload)]) + payload


async def test_filename_not_utf8_rejected(pipeline: Pipeline) -> None:
    # Hand-encoded UploadRequest{metadata{filename}} with bytes that are not
    # UTF-8, which no protobuf library would serialize for a string field.
    metadata = _length_delimited(1, _length_delimited(1, b"\xff\xfe.txt"))
    chunk = _length_delimited(2, b"some text\n")
    upload_call = pipeline.gateway_channel.stream_unary(
        "/ingestd.v1.UploadService/Upload",
        request_serializer=None,
        response_deserializer=upload_pb.UploadResponse.FromString,
    )

    async def raw():
        yield metadata
        yield chunk

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await upload_call(raw())

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must be valid UTF-8" in error.value.details()


async def test_huge_and_unknown_arguments_get_clear_errors(pipeline: Pipeline) -> None:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    # Quoted back in full, this id would make a status larger than a client
    # accepts, and the client would see a transport error instead.
    with pytest.raises(grpc.aio.AioRpcError) as huge:
        await stub.GetJob(upload_pb.GetJobRequest(job_id="x" * 100_000))
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.ListJobs(upload_pb.ListJobsRequest(statuses=[999]))

    assert huge.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id" in huge.value.details()
    assert "cut to its first 64 characters" in huge.value.details()
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.value.details().startswith("statuses: status 999 is not")


# Content types and file names.


@pytest.mark.parametrize(
    ("data", "detected"),
    [
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40, "ZIP archive"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 40, "PNG image"),
        (b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 60, "ELF executable"),
    ],
)
async def test_unsupported_type_rejected(
    pipeline: Pipeline, pool, data: bytes, detected: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await upload(pipeline, data, "report.pdf", content_type="application/pdf")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"detected {detected}" in error.value.details()
    assert not list((pipeline.settings.blob_dir / "tmp").glob("*.part"))
    async with pool.acquire() as connection:
        assert await connection.fetchval("SELECT count(*) FROM documents") == 0


async def test_declared_type_mismatch_recorded(pipeline: Pipeline, pool) -> None:
    response = await upload(
        pipeline,
        b"Plain text that claims to be a PDF.\n",
        "claims.pdf",
        content_type="application/pdf",
    )
    assert response.document.content_type == "text/plain"
    assert response.document.declared_content_type == "application/pdf"
    async with pool.acquire() as connection:
        detail = await connection.fetchval(
            "SELECT detail FROM job_events WHERE job_id = $1 AND to_status = 'uploaded'",
            uuid.UUID(response.job.job_id),
        )
    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert detail["declared_type_differs"] is True
    assert detail["declared_content_type"] == "application/pdf"
    job = await wait_terminal(pipeline, response.job.job_id)
    assert job.status == COMPLETE


@pytest.mark.parametrize(
    ("filename", "shown"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\eve\\report.txt", "report.txt"),
        ("bell\x07 and\x00 nul\x1b[31m.txt", "bell and nul[31m.txt"),
        ("invoice\u202etxt.exe", "invoicetxt.exe"),
        ("line\u2028break.txt", "linebreak.txt"),
        ("..", ""),
    ],
)
async def test_filename_sanitized_for_display(
    pipeline: Pipeline, filename: str, shown: str
) -> None:
    data = f"file uploaded as {filename!r}\n".encode()
    response = await upload(pipeline, data, filename)
    document = response.document
    assert document.filename == shown
    expected_key = raw_key("local", uuid.UUID(document.document_id))
    stored = list((pipeline.settings.blob_dir / "raw").rglob("*"))
    assert pipeline.settings.blob_dir / expected_key in stored
    assert all(path.name in ("local", document.document_id) for path in stored)


async def test_filename_thousands_of_chars(pipeline: Pipeline) -> None:
    filename = "é" * 5000 + ".md"
    response = await upload(pipeline, b"# Long name\n\nBody.\n", filename)
    assert len(response.document.filename) == 255
    assert response.document.filename.endswith("é.md")
    job = await wait_terminal(pipeline, response.job.job_id)
    assert job.status == COMPLETE


# The parse child's wall-clock limit.


async def stop_parse_child() -> psutil.Process:
    """Find the parse child of this process and stop it with SIGSTOP.

    A stopped process uses no CPU time, so only the wall-clock limit can end
    it, which stands for a parser blocked on I/O or a lock.
    """
    async with asyncio.timeout(60):
        while True:
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if "services.gateway.parse_child" in child.cmdline():
                        child.send_signal(signal.SIGSTOP)
                        return child
            await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    "settings",
    [{"parse_wall_timeout_seconds": 5, "max_concurrent_jobs": 1}],
    indirect=True,
)
async def test_parse_wall_limit_kills_child(pipeline: Pipeline) -> None:
    pages = [
        PdfPageSpec(lines=tuple(f"Page {n}, line {m}." for m in range(40)))
        for n in range(300)
    ]
    stuck = await upload(pipeline, build_pdf(pages), "stalls.pdf")
    child = await stop_parse_child()
    stuck_job = await wait_terminal(pipeline, stuck.job.job_id)
    good = await ingest(
        pipeline, b"# Next\n\nThe parse worker carries on.\n", "next.md"
    )

    assert stuck_job.status == FAILED_PARSE
    assert stuck_job.last_error.code == "limit_exceeded"
    assert "INGESTD_PARSE_WALL_TIMEOUT_SECONDS" in stuck_job.last_error.message
    assert "killed" in stuck_job.last_error.message
    assert not child.is_running()
    assert good.status == COMPLETE


@pytest.mark.parametrize(
    "settings", [{"parse_memory_limit_bytes": 64 * 1024 * 1024}], indirect=True
)
async def test_parse_memory_limit_fails_document(pipeline: Pipeline) -> None:
    data = corpus_file("pdf/pj_freeculture.pdf").read_bytes()
    big = await ingest(pipeline, data, "freeculture.pdf")
    small = await ingest(pipeline, b"# Small\n\nParsed within the limit.\n", "s.md")

    assert big.status == FAILED_PARSE
    assert big.last_error.code == "limit_exceeded"
    assert "INGESTD_PARSE_MEMORY_LIMIT_BYTES" in big.last_error.message
    assert "67108864 bytes" in big.last_error.message
    assert small.status == COMPLETE


@pytest.mark.parametrize("settings", [{"parse_timeout_seconds": 1}], indirect=True)
async def test_parse_cpu_limit_fails_document(pipeline: Pipeline) -> None:
    # A million nested elements: about 36 MB of HTML that takes the HTML
    # parser several CPU seconds, and little memory or text.
    data = b"<html><body>" + b"<div class=c><span>w</span></div>" * 1_000_000
    big = await ingest(pipeline, data + b"</body></html>", "nested.html")
    small = await ingest(pipeline, b"# Small\n\nParsed within the limit.\n", "s.md")

    assert big.status == FAILED_PARSE
    assert big.last_error.code == "limit_exceeded"
    assert "SIGXCPU" in big.last_error.message
    assert "CPU time limit of 1 s" in big.last_error.message
    assert "INGESTD_PARSE_TIMEOUT_SECONDS" in big.last_error.message
    assert small.status == COMPLETE


async def test_encrypted_pdf_uploaded_again_with_password(
    pipeline: Pipeline, pool: asyncpg.Pool
) -> None:
    data = corpus_file("pdf/pp_crazyones-encrypted-256.pdf").read_bytes()
    first = await upload(pipeline, data, "crazyones.pdf")
    locked = await wait_terminal(pipeline, first.job.job_id)
    wrong = await upload(pipeline, data, "crazyones.pdf", password="not-it")
    wrong_job = await wait_terminal(pipeline, wrong.job.job_id)
    right = await upload(pipeline, data, "crazyones.pdf", password="password")
    unlocked = await wait_terminal(pipeline, right.job.job_id)
    again = await upload(pipeline, data, "crazyones.pdf", password="password")

    assert locked.status == FAILED_PARSE
    assert locked.last_error.code == "encrypted_password_required"
    assert wrong.duplicate
    assert wrong.job.job_id == first.job.job_id
    assert wrong_job.status == FAILED_PARSE
    assert wrong_job.last_error.code == "encrypted_password_wrong"
    assert right.duplicate
    assert right.job.job_id == first.job.job_id
    assert unlocked.status == COMPLETE
    assert unlocked.progress.chunks_total > 0
    assert "crazy ones" in " ".join(await chunk_texts(pool, unlocked)).lower()
    # A complete job is left alone, and no password outlives its parse.
    assert again.job.status == COMPLETE
    async with pool.acquire() as connection:
        retries = await connection.fetchval(
            "SELECT count(*) FROM job_events WHERE job_id = $1"
            " AND detail->>'action' = 'retry_with_password'",
            uuid.UUID(first.job.job_id),
        )
        password = await connection.fetchval(
            "SELECT parse_password FROM upload_jobs WHERE job_id = $1",
            uuid.UUID(first.job.job_id),
        )
    assert retries == 2
    assert password is None


# An embedding backend that returns NaN.

POISON = "poisoned-chunk-marker"


class NaNEmbeddingHandler(BaseHTTPRequestHandler):
    """OpenAI-style /embeddings that returns NaN for any text with POISON."""

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = json.loads(self.rfile.read(length))
        data = []
        for index, text in enumerate(body["input"]):
            rng = random.Random(text)
            vector = [rng.uniform(-1, 1) for _ in range(384)]
            if POISON in text:
                vector[5] = math.nan
            data.append({"object": "embedding", "index": index, "embedding": vector})
        payload = json.dumps({"object": "list", "data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def nan_embedding_server() -> Iterator[str]:
    """Base URL of a loopback embeddings server that poisons marked texts."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), NaNEmbeddingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


async def test_nan_embedding_batch_not_written(
    settings: Settings, pool, nan_embedding_server: str
) -> None:
    api_settings = settings.model_copy(
        update={
            "embed_backend": "openai",
            "embed_api_url": nan_embedding_server,
            "embed_api_model": "nan-test",
            "embed_batch_size": 2,
            "chunk_min_tokens": 40,
            "chunk_max_tokens": 48,
            "chunk_overlap_tokens": 0,
        }
    )
    paragraphs = [
        f"Paragraph {n} describes shipment {n} and its route through the port."
        for n in range(24)
    ]
    paragraphs[20] += f" {POISON}"
    text = "\n\n".join(paragraphs)
    async with running_pipeline(api_settings) as pipeline:
        job = await ingest(pipeline, text.encode(), "poisoned.txt")

    assert job.status == FAILED_EMBEDDING
    assert job.last_error.code == "invalid_embedding"
    assert "NaN" in job.last_error.message
    async with pool.acquire() as connection:
        stored = await connection.fetch(
            """
            SELECT c.text FROM document_vector_buffer v
            JOIN document_chunk_buffer c USING (chunk_id)
            WHERE c.document_id = $1
            """,
            uuid.UUID(job.document_id),
        )
        searchable = await connection.fetchval(
            "SELECT count(*) FROM document_chunks WHERE document_id = $1",
            uuid.UUID(job.document_id),
        )
    stored_texts = [row["text"] for row in stored]
    assert stored_texts, "the batches before the poisoned one were stored"
    assert not any(POISON in text for text in stored_texts)
    assert len(stored_texts) < job.progress.chunks_total
    assert searchable == 0
