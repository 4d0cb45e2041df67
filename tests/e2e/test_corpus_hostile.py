"""Every corpus file through the whole pipeline, each with its expected outcome.

The corpus contains real files that broke other tools: truncated, fuzzed and
encrypted PDFs, scans without text, fonts that decode to garbage, lying
charsets, UTF-16 without a BOM, zero-byte files and lines of hundreds of
thousands of characters. One module-scoped pipeline ingests all of them at
once with the default limits, and one test case per file checks its job:
either ``complete`` with valid chunk text, or failed with the expected code.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingestd.v1 import resources_pb2
from shared.config import Settings
from tests.conftest import CORPUS, Pipeline, cloned_database, running_pipeline
from tests.e2e.harness import (
    chunk_text_problems,
    model_tokenizer,
    upload,
    wait_terminal,
)

# Embedding the corpus's roughly 8,400 chunks with the real model takes
# minutes on two cores, and far longer when the machine is shared. Both
# limits guard against a hang only.
CORPUS_LIMIT_SECONDS = 3600
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(CORPUS_LIMIT_SECONDS + 300)]

COMPLETE = "complete"
# Complete with no chunk: the document has no text at all and is not a scan.
COMPLETE_EMPTY = "complete, no chunks"
FAILED_PARSE = resources_pb2.JOB_STATUS_FAILED_PARSE

# Expected outcome per corpus file, with the default limits and no password.
# A code means failed_parse with that code in last_error.
EXPECTED: dict[str, str] = {
    "html/chardet_gb2312_mozilla_bug171813.html": COMPLETE,
    "html/chardet_plane1-utf-16le.html": COMPLETE,
    "html/chardet_shift-jis_no_encoding_specified.html": COMPLETE,
    "html/readability_aktualne.source.html": COMPLETE,
    "html/readability_comment-inside-script-parsing.source.html": COMPLETE,
    "html/readability_data-url-image.source.html": COMPLETE,
    "html/readability_hukumusume.source.html": COMPLETE,
    "html/readability_ietf-1.source.html": COMPLETE,
    "html/readability_keep-tabular-data.expected.html": COMPLETE,
    "html/readability_keep-tabular-data.source.html": COMPLETE,
    "html/readability_qq.source.html": COMPLETE,
    "html/readability_wikipedia.expected.html": COMPLETE,
    "html/readability_wikipedia.source.html": COMPLETE,
    "md/commonmark-spec.md": COMPLETE,
    "md/empty.md": COMPLETE_EMPTY,
    "md/marked_escaped_angles.md": COMPLETE,
    "md/marked_markdown_documentation_syntax.md": COMPLETE,
    "md/public-apis_README.md": COMPLETE,
    "md/pypdf_docs_extract-text.md": COMPLETE,
    "md/system-design-primer_README-zh-Hans.md": COMPLETE,
    "md/system-design-primer_README.md": COMPLETE,
    "md/system-design-primer_pastebin_README.md": COMPLETE,
    "pdf/hs_non_text_searchable.pdf": "no_text_layer",
    "pdf/pj_SimFang-variant.pdf": COMPLETE,
    "pdf/pj_ThuluthFeatures.pdf": "unreadable_text",
    "pdf/pj_bomb_giant.pdf": COMPLETE,
    "pdf/pj_copy_paste_ligatures.pdf": COMPLETE,
    "pdf/pj_empty.pdf": COMPLETE_EMPTY,
    "pdf/pj_filled-background.pdf": COMPLETE_EMPTY,
    "pdf/pj_freeculture.pdf": COMPLETE,
    "pdf/pj_hello_world_rotated.pdf": COMPLETE,
    "pdf/pj_helloworld-bad.pdf": COMPLETE,
    "pdf/pj_issue15590.pdf": "corrupt_file",
    "pdf/pj_pdkids.pdf": COMPLETE,
    "pdf/pj_poppler-90-0-fuzzed.pdf": COMPLETE,
    "pdf/pj_sci-notation.pdf": COMPLETE,
    "pdf/pj_standard_fonts.pdf": COMPLETE,
    "pdf/pj_tracemonkey.pdf": COMPLETE,
    "pdf/pm_encryption_aes-256-r6.pdf": "encrypted_password_required",
    "pdf/pm_issue-1113-evil-xobjects.pdf": COMPLETE,
    "pdf/pm_jo.pdf": COMPLETE,
    "pdf/pm_pdf-with-jbig2.pdf": "no_text_layer",
    "pdf/pm_pr-00530-ml-lines.pdf": COMPLETE,
    "pdf/pm_simple1.pdf": COMPLETE,
    "pdf/pm_zen_of_python_corrupted.pdf": COMPLETE,
    "pdf/pp_Seige_of_Vicksburg_Sample_OCR.pdf": COMPLETE,
    "pdf/pp_crazyones-encrypted-256.pdf": "encrypted_password_required",
    "pdf/pp_encryption_r6-user-password.pdf": "encrypted_password_required",
    # NOTE: the OCR layer of this scan is garbage made of punctuation and
    # stray letters, which no check recognizes, so it is indexed.
    "pdf/pp_issue-301.pdf": COMPLETE,
    "pdf/pp_multilang.pdf": COMPLETE,
    "pdf/sf_GeoTopo-komprimiert.pdf": COMPLETE,
    "pdf/sf_habibi.pdf": COMPLETE,
    "pdf/sf_imagemagick-CCITTFaxDecode.pdf": "no_text_layer",
    "pdf/sf_libreoffice-writer-password.pdf": "encrypted_password_required",
    "pdf/sf_minimal-document.pdf": COMPLETE,
    "pdf/sf_multicolumn.pdf": COMPLETE,
    "txt/chardet_macroman_ioreg_output.txt": COMPLETE,
    "txt/chardet_shift-jis_cr-only.txt": COMPLETE,
    "txt/chardet_utf-16le_nobom.txt": COMPLETE,
    "txt/chardet_utf-8-bom.txt": COMPLETE,
    "txt/chardet_windows-1252.txt": COMPLETE,
    "txt/commonmark_changelog.txt": COMPLETE,
    # Zero bytes, like md/empty.md, so both uploads are one document.
    "txt/empty.txt": COMPLETE_EMPTY,
    "txt/gutenberg_pg11_alice_crlf.txt": COMPLETE,
    "txt/gutenberg_pg1661_sherlock_crlf.txt": COMPLETE,
    "txt/pypdf_multicolumn-lorem-ipsum.txt": COMPLETE,
    "txt/tinyshakespeare.txt": COMPLETE,
}

# User passwords of the encrypted files, from the corpus manifest. Another
# user uploads each file with its password, at the same time as the upload
# without one, so that both outcomes are kept side by side.
# tests/e2e/test_hostile_inputs.py covers one user uploading again with the
# password after a failure.
PASSWORDS: dict[str, str] = {
    "pdf/pm_encryption_aes-256-r6.pdf": "usersecret",
    "pdf/pp_crazyones-encrypted-256.pdf": "password",
    "pdf/pp_encryption_r6-user-password.pdf": "asdfzxcv",
    "pdf/sf_libreoffice-writer-password.pdf": "openpassword",
}
USER = "corpus"
PASSWORD_USER = "corpus-with-password"
UPLOADS_AT_ONCE = 8


@dataclass(frozen=True)
class Outcome:
    """Outcome of one upload: its final job and its searchable chunk texts.

    ``job`` is None when the job did not reach a terminal status in time,
    and ``wait_error`` then contains the reason.
    """

    job: resources_pb2.Job | None
    chunk_texts: list[str]
    wait_error: str = ""


@dataclass
class CorpusRun:
    """Outcomes of the whole corpus, keyed by (file, password), and the pipeline."""

    outcomes: dict[tuple[str, str], Outcome]
    pipeline: Pipeline
    seconds: float


def corpus_files() -> list[str]:
    """List the corpus files on disk, relative to the corpus folder."""
    return sorted(
        path.relative_to(CORPUS).as_posix()
        for path in CORPUS.rglob("*")
        if path.is_file() and path.name != "MANIFEST.tsv"
    )


@pytest.fixture(scope="module")
async def corpus_run(
    postgres_url: str, template_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[CorpusRun]:
    """Upload every corpus file at once, with and without passwords, and wait."""
    if not CORPUS.is_dir():
        pytest.skip(f"corpus folder {CORPUS} is absent; this test needs it")
    folder = tmp_path_factory.mktemp("corpus-run")
    async with cloned_database(postgres_url) as database_url:
        settings = Settings(
            database_url=database_url,
            data_dir=folder / "data",
            gateway_port=0,
            chunker_port=0,
            embedder_port=0,
            lease_seconds=60,
            poll_interval_seconds=1,
            backoff_base_seconds=0.2,
            backoff_max_seconds=1,
            shutdown_grace_seconds=5,
            max_concurrent_uploads=UPLOADS_AT_ONCE,
            max_concurrent_uploads_per_user=UPLOADS_AT_ONCE,
            log_format="text",
            allow_unauthenticated=True,
            # Every file is uploaded and watched at once, faster than the
            # default per-user rate allows and by more watches than one
            # user may hold by default.
            rate_limit="1000/second",
            max_concurrent_watches_per_user=128,
        )
        async with running_pipeline(settings) as pipeline:
            started = time.monotonic()
            outcomes = await ingest_corpus(pipeline)
            yield CorpusRun(outcomes, pipeline, time.monotonic() - started)


async def ingest_corpus(pipeline: Pipeline) -> dict[tuple[str, str], Outcome]:
    runs = [(name, "") for name in corpus_files()] + list(PASSWORDS.items())
    gate = asyncio.Semaphore(UPLOADS_AT_ONCE)

    async def send(name: str, password: str):
        async with gate:
            return await upload(
                pipeline,
                (CORPUS / name).read_bytes(),
                Path(name).name,
                user=PASSWORD_USER if password else USER,
                password=password,
            )

    responses = await asyncio.gather(*(send(name, pw) for name, pw in runs))
    jobs = await asyncio.gather(
        *(
            wait_terminal(
                pipeline,
                response.job.job_id,
                user=PASSWORD_USER if pw else USER,
                limit_seconds=CORPUS_LIMIT_SECONDS,
            )
            for (_, pw), response in zip(runs, responses, strict=True)
        ),
        return_exceptions=True,
    )
    outcomes: dict[tuple[str, str], Outcome] = {}
    async with pipeline.gateway.runtime.pool.acquire() as connection:
        for run, job in zip(runs, jobs, strict=True):
            if isinstance(job, BaseException):
                outcomes[run] = Outcome(None, [], f"{type(job).__name__}: {job}")
                continue
            rows = await connection.fetch(
                "SELECT text FROM document_chunks WHERE job_id = $1 ORDER BY chunk_ord",
                uuid.UUID(job.job_id),
            )
            outcomes[run] = Outcome(job, [row["text"] for row in rows])
    return outcomes


def test_corpus_table_lists_every_file() -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"corpus folder {CORPUS} is absent; this test needs it")
    assert sorted(EXPECTED) == corpus_files()


def check_outcome(outcome: Outcome, expected: str) -> None:
    job = outcome.job
    assert job is not None, f"no terminal status: {outcome.wait_error}"
    if expected in (COMPLETE, COMPLETE_EMPTY):
        assert job.status == resources_pb2.JOB_STATUS_COMPLETE, (
            f"{resources_pb2.JobStatus.Name(job.status)}: {job.last_error}"
        )
        assert len(outcome.chunk_texts) == job.progress.chunks_total
        if expected == COMPLETE:
            assert outcome.chunk_texts, "complete without a single chunk"
        else:
            assert not outcome.chunk_texts
        tokenizer = model_tokenizer()
        for ordinal, text in enumerate(outcome.chunk_texts):
            problems = chunk_text_problems(text, tokenizer, 256)
            assert not problems, f"chunk {ordinal}: {problems}: {text[:80]!r}"
        return
    assert job.status == FAILED_PARSE, resources_pb2.JobStatus.Name(job.status)
    assert job.last_error.code == expected
    assert job.last_error.stage == "parse"
    assert len(job.last_error.message) > 20
    assert not outcome.chunk_texts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_outcome(corpus_run: CorpusRun, name: str) -> None:
    check_outcome(corpus_run.outcomes[(name, "")], EXPECTED[name])


@pytest.mark.parametrize("name", sorted(PASSWORDS))
def test_corpus_encrypted_with_password(corpus_run: CorpusRun, name: str) -> None:
    check_outcome(corpus_run.outcomes[(name, PASSWORDS[name])], COMPLETE)


async def test_corpus_services_still_serving(corpus_run: CorpusRun) -> None:
    pipeline = corpus_run.pipeline
    for channel in (
        pipeline.gateway_channel,
        pipeline.chunker_channel,
        pipeline.embedder_channel,
    ):
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest()
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    after = await upload(
        pipeline, b"# After the corpus\n\nThe workers still run.\n", "after.md"
    )
    job = await wait_terminal(pipeline, after.job.job_id)
    assert job.status == resources_pb2.JOB_STATUS_COMPLETE
    print(f"corpus ingested in {corpus_run.seconds:.0f} s")


def test_corpus_password_runs_use_other_user(corpus_run: CorpusRun) -> None:
    for name, password in PASSWORDS.items():
        plain = corpus_run.outcomes[(name, "")].job
        unlocked = corpus_run.outcomes[(name, password)].job
        assert plain is not None
        assert unlocked is not None
        assert plain.document_id != unlocked.document_id
