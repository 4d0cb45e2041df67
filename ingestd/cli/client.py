"""Blocking gRPC client helpers for the CLI."""

from __future__ import annotations

import collections
import mimetypes
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import tenacity
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ingestd.v1 import upload_service_pb2 as upload_pb
from shared.tls import channel_credentials

T = TypeVar("T")

UPLOAD_CHUNK_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class _AuthInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer KEY`` to every call on a channel."""

    def __init__(self, api_key: str) -> None:
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation, client_call_details, request_iterator
    ):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation, client_call_details, request_iterator
    ):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        (
            "method",
            "timeout",
            "metadata",
            "credentials",
            "wait_for_ready",
            "compression",
        ),
    ),
    grpc.ClientCallDetails,
):
    pass


def open_channel(
    target: str,
    *,
    api_key: str | None = None,
    tls: bool = False,
    tls_ca_file: Path | None = None,
) -> grpc.Channel:
    """Open a channel to target (host:port), with TLS and the API key when given."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if tls:
        channel = grpc.secure_channel(
            target, channel_credentials(tls_ca_file), options=options
        )
    else:
        channel = grpc.insecure_channel(target, options=options)
    if api_key:
        return grpc.intercept_channel(channel, _AuthInterceptor(api_key))
    return channel


def call_metadata(user: str | None) -> list[tuple[str, str]]:
    """Metadata that names the user the call acts for."""
    return [("x-ingestd-user", user)] if user else []


def upload_requests(
    path: Path, password: str | None = None
) -> Iterator[upload_pb.UploadRequest]:
    """Yield the metadata message, then the file in 64 KiB chunks."""
    declared, _ = mimetypes.guess_type(path.name)
    if path.suffix.lower() in {".md", ".markdown"}:
        declared = "text/markdown"
    yield upload_pb.UploadRequest(
        metadata=upload_pb.UploadMetadata(
            filename=path.name,
            content_type=declared or "",
            size_bytes=path.stat().st_size,
            password=password or "",
        )
    )
    with path.open("rb") as handle:
        while block := handle.read(UPLOAD_CHUNK_BYTES):
            yield upload_pb.UploadRequest(chunk=block)


# Refusals that mean "not now" rather than "not this": the per-key rate
# limit and the gateway's limits on uploads in progress. The CLI waits and
# tries again, so a folder of many files is uploaded in full.
RETRYABLE_REASONS = frozenset(
    {"RATE_LIMITED", "TOO_MANY_UPLOADS", "TOO_MANY_UPLOADS_FOR_USER"}
)
# How long the CLI keeps trying one call before it reports the refusal.
RETRY_SECONDS = 120.0


def error_reason(error: grpc.RpcError) -> str | None:
    """Return the ErrorInfo reason of a failed call, if the server sent one."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        # The rich status does not match the call's own code or message.
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def is_retryable(error: BaseException) -> bool:
    """True for a RESOURCE_EXHAUSTED refusal that a later try can pass."""
    return (
        isinstance(error, grpc.RpcError)
        and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        and error_reason(error) in RETRYABLE_REASONS
    )


def with_retries(call: Callable[[], T]) -> T:
    """Run call, trying again with growing waits while the gateway refuses it for now."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_retryable),
        wait=tenacity.wait_exponential(multiplier=0.25, max=5.0),
        stop=tenacity.stop_after_delay(RETRY_SECONDS),
        reraise=True,
    )
    return retrying(call)
