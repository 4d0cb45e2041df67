"""The chunker and model versions that new jobs are stamped with.

A job's identity includes the chunker version and the embedding model
version, so the gateway asks the running chunker and embedder for them over
gRPC. The answer is cached and refreshed in the background, so an upload
needs them to have been reachable once, not at the moment of the upload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from ingestd.v1 import (
    chunker_service_pb2,
    chunker_service_pb2_grpc,
    embedder_service_pb2,
    embedder_service_pb2_grpc,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineIdentity:
    """The versions a new job is created with."""

    chunker_name: str
    chunker_version: str
    embed_model: str
    embed_version: str


class IdentityUnavailableError(Exception):
    """The chunker or embedder has not responded yet."""


class IdentityCache:
    """Fetches the pipeline identity and keeps it fresh."""

    def __init__(
        self,
        chunker: chunker_service_pb2_grpc.ChunkerServiceStub,
        embedder: embedder_service_pb2_grpc.EmbedderServiceStub,
        *,
        chunker_target: str,
        embedder_target: str,
        refresh_seconds: float = 30.0,
    ) -> None:
        self._chunker = chunker
        self._embedder = embedder
        self._targets = (chunker_target, embedder_target)
        self._refresh_seconds = refresh_seconds
        self._identity: PipelineIdentity | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> PipelineIdentity:
        """Return the identity, fetching it when missing or stale."""
        if self._identity is None or self._is_stale():
            async with self._lock:
                if self._identity is not None and not self._is_stale():
                    return self._identity
                try:
                    await self._fetch()
                except grpc.aio.AioRpcError as exc:
                    if self._identity is None:
                        raise IdentityUnavailableError(
                            f"cannot reach the chunker at {self._targets[0]} or the embedder "
                            f"at {self._targets[1]} ({exc.code().name}: {exc.details()}); "
                            "start them, or set INGESTD_CHUNKER_ADDRESS and "
                            "INGESTD_EMBEDDER_ADDRESS"
                        ) from exc
                    log.warning(
                        "keeping the cached pipeline identity; refresh failed",
                        extra={
                            "event": "identity_refresh_failed",
                            "error": exc.code().name,
                        },
                    )
        assert self._identity is not None
        return self._identity

    def _is_stale(self) -> bool:
        return time.monotonic() - self._fetched_at > self._refresh_seconds

    async def _fetch(self) -> None:
        chunker, model = await asyncio.gather(
            self._chunker.GetChunkerInfo(
                chunker_service_pb2.GetChunkerInfoRequest(), timeout=10
            ),
            self._embedder.GetModelInfo(
                embedder_service_pb2.GetModelInfoRequest(), timeout=10
            ),
        )
        identity = PipelineIdentity(
            chunker.chunker_name,
            chunker.chunker_version,
            model.embed_model,
            model.embed_version,
        )
        if identity != self._identity:
            log.info(
                "pipeline identity",
                extra={
                    "event": "identity_fetched",
                    "chunker_version": identity.chunker_version,
                    "embed_model": identity.embed_model,
                    "embed_version": identity.embed_version,
                },
            )
        self._identity = identity
        self._fetched_at = time.monotonic()
