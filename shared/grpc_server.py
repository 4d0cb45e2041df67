"""gRPC server bootstrap shared by the three services.

Every server gets health checking, reflection and message size limits. An
interceptor sets the request id and the caller's user id, and turns
unexpected exceptions into INTERNAL. Graceful shutdown also drains the stage
worker that runs in the same event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from shared.config import Settings, get_settings
from shared.db import create_pool, resolve_database_url
from shared.ids import check_user_id
from shared.logging import configure_logging, request_id_var
from shared.notify import JobListener
from shared.storage import LocalBlobStore
from shared.worker import BaseWorker

log = logging.getLogger(__name__)

USER_METADATA_KEY = "x-ingestd-user"
REQUEST_ID_METADATA_KEY = "x-request-id"
ERROR_DOMAIN = "ingestd.dev"

user_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("user_id")


def current_user() -> str:
    """Return the user id of the call being handled."""
    return user_id_var.get()


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    field_name: str | None = None,
) -> None:
    """End the call with code and message, plus machine-readable details.

    The details carry an ErrorInfo with reason (an UPPER_SNAKE_CASE code) and,
    for a bad field, a BadRequest naming it. grpcurl and `buf curl` show both.
    """
    details = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=reason,
            domain=ERROR_DOMAIN,
            metadata={"request_id": request_id_var.get() or ""},
        )
    )
    details.append(info)
    if field_name is not None:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=field_name, description=message[:500]
                    )
                ]
            )
        )
        details.append(bad_request)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    await context.abort_with_status(rpc_status.to_status(status))


class CallContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request id and user id for each call and maps stray errors.

    The user id comes from the ``x-ingestd-user`` metadata, or the default
    user when it is absent. Health and reflection calls pass through.
    """

    def __init__(self, default_user: str) -> None:
        self._default_user = default_user

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith("/ingestd."):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        request_id = str(metadata.get(REQUEST_ID_METADATA_KEY) or uuid.uuid4())[:64]
        user = str(metadata.get(USER_METADATA_KEY) or self._default_user)
        return _wrap_handler(handler, method, request_id, user)


def _wrap_handler(
    handler: grpc.RpcMethodHandler, method: str, request_id: str, user: str
) -> grpc.RpcMethodHandler:
    async def prepare(context: grpc.aio.ServicerContext) -> None:
        request_id_var.set(request_id)
        try:
            user_id_var.set(check_user_id(user))
        except ValueError as exc:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid {USER_METADATA_KEY} metadata: {exc}",
                reason="INVALID_USER_ID",
            )

    async def internal(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        log.error(
            "unhandled error in %s",
            method,
            exc_info=exc,
            extra={"event": "rpc_internal_error", "method": method},
        )
        code = grpc.StatusCode.INTERNAL
        message = f"internal error; quote request id {request_id} when reporting it"
        if isinstance(
            exc, (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
        ):
            code = grpc.StatusCode.UNAVAILABLE
            message = f"a backing service is unavailable; retry later (request id {request_id})"
        await abort(context, code, message, reason="INTERNAL")

    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await prepare(context)
            try:
                return await inner_uu(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await internal(context, exc)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await prepare(context)
            try:
                return await inner_su(requests, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await internal(context, exc)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await prepare(context)
            try:
                async for response in inner_us(request, context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await internal(context, exc)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler


@dataclass
class Runtime:
    """Resources every service process shares: settings, database and storage."""

    settings: Settings
    database_url: str
    pool: asyncpg.Pool
    listener: JobListener
    storage: LocalBlobStore

    @classmethod
    async def open(cls, settings: Settings, *, service: str = "ingestd") -> Runtime:
        database_url = await asyncio.to_thread(resolve_database_url, settings)
        pool = await create_pool(database_url, settings)
        listener = JobListener(database_url, service=service)
        listener.start()
        return cls(
            settings, database_url, pool, listener, LocalBlobStore(settings.blob_dir)
        )

    async def close(self) -> None:
        await self.listener.stop()
        await self.pool.close()


@dataclass
class ServiceParts:
    """Servicers, worker and tasks that one service adds to the common server."""

    # Adds the service's servicers to the server.
    register: Callable[[grpc.aio.Server], None]
    # Full names of the services registered, for health and reflection.
    service_names: list[str]
    worker: BaseWorker | None = None
    # Extra long-running tasks, such as a periodic archiver.
    background: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Called after the server stopped, to close clients and models.
    close: Callable[[], Awaitable[None]] | None = None


class RunningService:
    """A started server with its worker, stoppable as one unit."""

    def __init__(
        self,
        name: str,
        server: grpc.aio.Server,
        port: int,
        health_servicer: health.aio.HealthServicer,
        parts: ServiceParts,
        runtime: Runtime,
    ) -> None:
        self.name = name
        self.server = server
        self.port = port
        self.health = health_servicer
        self.parts = parts
        self.runtime = runtime
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._skip_grace = asyncio.Event()

    def start_background(self) -> None:
        if self.parts.worker is not None and self.runtime.settings.worker_enabled:
            self._tasks.append(
                asyncio.create_task(self.parts.worker.run(), name=f"{self.name}-worker")
            )
        for factory in self.parts.background:
            self._tasks.append(
                asyncio.create_task(factory(), name=f"{self.name}-background")
            )

    def skip_grace(self) -> None:
        """Make a stop in progress skip what is left of its grace period."""
        self._skip_grace.set()

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, stop claiming, finish or release, close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = (
            self.runtime.settings.shutdown_grace_seconds
            if grace_seconds is None
            else grace_seconds
        )
        log.info(
            "shutting down",
            extra={
                "event": "service_stopping",
                "service": self.name,
                "grace_seconds": grace,
            },
        )
        await self.health.enter_graceful_shutdown()
        worker = self.parts.worker
        if worker is not None:
            worker.request_stop()
            drain = asyncio.create_task(worker.drain(grace))
            skip = asyncio.create_task(self._skip_grace.wait())
            await asyncio.wait({drain, skip}, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                # A second signal: release what is running now.
                drain.cancel()
                await asyncio.shield(worker.drain(0))
            skip.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.server.stop(grace=min(grace, 5.0))
        if self.parts.close is not None:
            await self.parts.close()
        await self.runtime.close()
        log.info("stopped", extra={"event": "service_stopped", "service": self.name})


async def start_service(
    name: str,
    port: int,
    build: Callable[[Runtime], Awaitable[ServiceParts]],
    *,
    settings: Settings,
    runtime: Runtime | None = None,
) -> RunningService:
    """Open the runtime, build the service, bind the port and start serving."""
    runtime = runtime or await Runtime.open(settings, service=name)
    parts = await build(runtime)
    options = [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        interceptors=[CallContextInterceptor(settings.default_user)],
        options=options,
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    parts.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        *parts.service_names,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    ]
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{settings.host}:{port}")
    if bound == 0:
        raise RuntimeError(
            f"cannot listen on {settings.host}:{port}; the port is in use or the "
            f"address is not local. Set INGESTD_{name.upper()}_PORT to a free port"
        )
    await server.start()
    for service_name in ["", *parts.service_names]:
        await health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningService(name, server, bound, health_servicer, parts, runtime)
    running.start_background()
    log.info(
        "serving",
        extra={
            "event": "service_started",
            "service": name,
            "address": f"{settings.host}:{bound}",
        },
    )
    return running


def run_service(
    name: str,
    port_of: Callable[[Settings], int],
    build: Callable[[Runtime], Awaitable[ServiceParts]],
) -> None:
    """Run a service until SIGTERM or SIGINT; a second signal skips the grace period."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)

    async def main() -> None:
        running = await start_service(name, port_of(settings), build, settings=settings)
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop_requested.is_set():
                log.warning(
                    "second signal; skipping the grace period",
                    extra={"event": "shutdown_forced"},
                )
                running.skip_grace()
                return
            log.info(
                "signal %s received",
                signal.Signals(signum).name,
                extra={"event": "shutdown_signal"},
            )
            stop_requested.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await stop_requested.wait()
        await running.stop()

    asyncio.run(main())
