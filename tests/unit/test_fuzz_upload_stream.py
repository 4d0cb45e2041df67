"""Property test of the Upload stream protocol against a running gateway.

Hypothesis sends streams of metadata, file chunks and empty messages in any
order and size, and the gateway's status must match a model of the
protocol: metadata once and first, the size limit checked as bytes arrive,
and a declared size that must match what arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import string
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared.config import Settings
from tests.conftest import Pipeline

MAX_UPLOAD_BYTES = 4096
OK = grpc.StatusCode.OK


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared test settings with a small upload limit."""
    return settings.model_copy(update={"max_upload_bytes": MAX_UPLOAD_BYTES})


@dataclass(frozen=True)
class Message:
    """One generated stream message: metadata, a chunk, or no payload."""

    kind: str
    data: bytes = b""
    declared: str = "none"


METADATA = st.builds(
    Message,
    kind=st.just("metadata"),
    declared=st.sampled_from(["none", "exact", "off_by_one", "over_limit"]),
)
CHUNK = st.builds(
    Message,
    kind=st.just("chunk"),
    # Letters and spaces only, so no stream is rejected as binary data.
    data=st.text(string.ascii_letters + " \n", max_size=3000).map(str.encode),
)
MESSAGE = st.one_of(METADATA, CHUNK, st.just(Message("empty")))
# Any order, or the well-formed order with chunks of any size.
STREAMS = st.one_of(
    st.lists(MESSAGE, max_size=6),
    st.builds(
        lambda metadata, rest: [metadata, *rest],
        METADATA,
        st.lists(st.one_of(CHUNK, st.just(Message("empty"))), max_size=5),
    ),
)


def declared_size(kind: str, total: int) -> int:
    return {
        "none": 0,
        "exact": total,
        "off_by_one": total + 1,
        "over_limit": MAX_UPLOAD_BYTES + 1,
    }[kind]


def expected_status(messages: list[Message], total: int) -> grpc.StatusCode:
    """Return the status the gateway must send, by the protocol's rules."""
    metadata: Message | None = None
    received = 0
    for message in messages:
        if message.kind == "metadata":
            if metadata is not None:
                return grpc.StatusCode.INVALID_ARGUMENT
            metadata = message
            if declared_size(message.declared, total) > MAX_UPLOAD_BYTES:
                return grpc.StatusCode.RESOURCE_EXHAUSTED
            continue
        if metadata is None:
            return grpc.StatusCode.INVALID_ARGUMENT
        received += len(message.data)
        if received > MAX_UPLOAD_BYTES:
            return grpc.StatusCode.RESOURCE_EXHAUSTED
    if metadata is None:
        return grpc.StatusCode.INVALID_ARGUMENT
    declared = declared_size(metadata.declared, total)
    if declared and declared != received:
        return grpc.StatusCode.INVALID_ARGUMENT
    return OK


def to_requests(messages: list[Message], total: int) -> list[upload_pb.UploadRequest]:
    requests = []
    for message in messages:
        if message.kind == "metadata":
            size = declared_size(message.declared, total)
            requests.append(
                upload_pb.UploadRequest(
                    metadata=upload_pb.UploadMetadata(
                        filename="fuzz.txt", size_bytes=size
                    )
                )
            )
        elif message.kind == "chunk":
            requests.append(upload_pb.UploadRequest(chunk=message.data))
        else:
            requests.append(upload_pb.UploadRequest())
    return requests


@hypothesis_settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(messages=STREAMS)
async def test_upload_stream_follows_protocol(
    pipeline: Pipeline, messages: list[Message]
) -> None:
    chunks = b"".join(message.data for message in messages)
    total = len(chunks)
    expected = expected_status(messages, total)
    stub = upload_grpc.UploadServiceStub(pipeline.gateway_channel)

    # Requests are written one by one, not from an iterator. When the server
    # ends the call early, grpcio's asyncio client can fail a write with
    # INTERNAL ("Failed execute_batch"). The call's own status is still the
    # server's, so the test stops writing and checks that status.
    call = stub.Upload()
    for request in to_requests(messages, total):
        try:
            await call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            break
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.done_writing()
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        failure = error
    else:
        failure = None
    if failure is not None:
        assert failure.code() == expected, failure.details()
        assert failure.details()
        return
    assert expected == OK
    assert response.document.byte_size == total
    assert response.document.raw_sha256 == hashlib.sha256(chunks).hexdigest()
    # A stream the gateway refused in an earlier example may still be
    # removing its partial file: the client has the status before the
    # handler's cleanup ends. Every partial file must be gone soon after.
    parts = pipeline.settings.blob_dir / "tmp"
    for _ in range(250):
        if not list(parts.glob("*.part")):
            break
        await asyncio.sleep(0.02)
    else:
        pytest.fail(f"partial uploads left behind: {list(parts.glob('*.part'))}")
