"""The gateway: UploadService, SearchService and the parse worker."""

from __future__ import annotations

import grpc

from ingestd.v1 import (
    chunker_service_pb2_grpc,
    embedder_service_pb2_grpc,
    search_service_pb2,
    search_service_pb2_grpc,
    upload_service_pb2,
    upload_service_pb2_grpc,
)
from services.gateway.identity import IdentityCache
from services.gateway.parse_worker import ParseWorker
from services.gateway.search import SearchServicer
from services.gateway.upload import UploadServicer
from shared.grpc_server import Runtime, ServiceParts, run_service
from shared.tls import channel_credentials


def _channel(target: str, runtime: Runtime) -> grpc.aio.Channel:
    size = runtime.settings.grpc_max_message_bytes
    options = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
    ]
    if runtime.settings.tls_enabled:
        # With TLS on, the other services serve it too, and the gateway
        # checks their certificates against tls_ca_file.
        credentials = channel_credentials(runtime.settings.tls_ca_file)
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


async def build(runtime: Runtime) -> ServiceParts:
    """Create the gateway's servicers, its clients of the other stages, and its worker."""
    settings = runtime.settings
    embedder_channel = _channel(settings.embedder_target, runtime)
    chunker_channel = _channel(settings.chunker_target, runtime)
    embedder = embedder_service_pb2_grpc.EmbedderServiceStub(embedder_channel)
    identity = IdentityCache(
        chunker_service_pb2_grpc.ChunkerServiceStub(chunker_channel),
        embedder,
        chunker_target=settings.chunker_target,
        embedder_target=settings.embedder_target,
    )
    upload = UploadServicer(
        pool=runtime.pool,
        storage=runtime.storage,
        settings=settings,
        identity=identity,
        listener=runtime.listener,
    )
    search = SearchServicer(
        pool=runtime.pool, embedder=embedder, embedder_target=settings.embedder_target
    )
    worker = ParseWorker(
        storage=runtime.storage,
        pool=runtime.pool,
        database_url=runtime.database_url,
        settings=settings,
        listener=runtime.listener,
    )

    def register(server: grpc.aio.Server) -> None:
        upload_service_pb2_grpc.add_UploadServiceServicer_to_server(upload, server)
        search_service_pb2_grpc.add_SearchServiceServicer_to_server(search, server)

    async def close() -> None:
        await embedder_channel.close()
        await chunker_channel.close()

    return ServiceParts(
        register=register,
        service_names=[
            upload_service_pb2.DESCRIPTOR.services_by_name["UploadService"].full_name,
            search_service_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name,
        ],
        worker=worker,
        close=close,
    )


def main() -> None:
    """Run the gateway until SIGTERM."""
    run_service("gateway", lambda settings: settings.gateway_port, build)
