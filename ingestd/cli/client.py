"""Blocking gRPC client helpers for the CLI."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from pathlib import Path

import grpc

from ingestd.v1 import upload_service_pb2 as upload_pb

UPLOAD_CHUNK_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def open_channel(target: str) -> grpc.Channel:
    """Open an insecure channel to target (host:port)."""
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )


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
