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
import dataclasses
import logging
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from shared.auth import KeyVerifier, Principal, count_active_keys, split_key
from shared.config import Settings, SettingsError, get_settings
from shared.db import create_pool, resolve_database_url
from shared.errors import DATABASE_ERRORS
from shared.ids import check_user_id
from shared.logging import configure_logging, request_id_var
from shared.notify import JobListener
from shared.storage import LocalBlobStore
from shared.tls import server_credentials
from shared.worker import BaseWorker

log = logging.getLogger(__name__)

USER_METADATA_KEY = "x-ingestd-user"
AUTHORIZATION_METADATA_KEY = "authorization"
REQUEST_ID_METADATA_KEY = "x-request-id"
ERROR_DOMAIN = "ingestd.dev"

user_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("user_id")
principal_var: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_user() -> str:
    """Return the user id of the call being handled."""
    return user_id_var.get()


def current_principal() -> Principal:
    """Return the authenticated caller of the call being handled."""
    return principal_var.get()


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


class Access(StrEnum):
    """Access level of a method: the key a caller needs."""

    # Anyone, without a key: discovery calls such as GetModelInfo.
    PUBLIC = "public"
    # Any valid key; the call acts for the key's user.
    USER = "user"
    # Admin keys only: pipeline-wide status and lists.
    ADMIN = "admin"


class CallContextInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call, sets its request id and user, and maps stray errors.

    A call proves who it acts for with ``authorization: Bearer KEY``
    metadata. An admin key may act for another user by adding
    ``x-ingestd-user``. With allow_unauthenticated on, a call without a key
    acts for ``x-ingestd-user`` or the default user, with admin rights.
    Health and reflection calls pass through untouched.
    """

    def __init__(
        self,
        settings: Settings,
        verifier: KeyVerifier,
        access: Mapping[str, Access] | None = None,
    ) -> None:
        self._settings = settings
        self._verifier = verifier
        self._access = dict(access or {})
        self._limits = parse_many(settings.rate_limit)
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

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
        access = self._access.get(method, Access.USER)

        async def authorize(context: grpc.aio.ServicerContext) -> None:
            principal = await self._authenticate(context, metadata, access)
            if access is Access.ADMIN and not principal.is_admin:
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs an admin key, and key {principal.key_id} is not "
                    "one; create one with `ingestd keys create --user USER --admin`",
                    reason="ADMIN_KEY_REQUIRED",
                )
            if access is not Access.PUBLIC:
                await self._check_rate(context, principal)
            principal_var.set(principal)
            user_id_var.set(principal.user_id)

        return _wrap_handler(handler, method, request_id, authorize)

    async def _authenticate(
        self,
        context: grpc.aio.ServicerContext,
        metadata: Mapping[str, Any],
        access: Access,
    ) -> Principal:
        requested_user = metadata.get(USER_METADATA_KEY)
        token = _bearer_token(metadata.get(AUTHORIZATION_METADATA_KEY))
        if access is Access.PUBLIC:
            return Principal(self._settings.default_user, is_admin=False)
        if token is None:
            if not self._settings.allow_unauthenticated:
                await abort(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing API key; send the metadata 'authorization: Bearer KEY', "
                    "and create a key with `ingestd keys create --user USER`",
                    reason="API_KEY_MISSING",
                )
            user = await self._checked_user(
                context, str(requested_user or self._settings.default_user)
            )
            return Principal(user, is_admin=True)
        try:
            principal = await self._verifier.verify(token)
        except DATABASE_ERRORS as exc:
            log.warning(
                "cannot check an API key: %s",
                exc,
                extra={"event": "auth_unavailable", "reason": str(exc)},
            )
            await abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "cannot check the API key because the database is unavailable; retry later",
                reason="AUTH_UNAVAILABLE",
            )
            raise AssertionError("unreachable") from None
        if principal is None:
            parts = split_key(token)
            named = f"API key {parts[0]}" if parts else "the API key"
            # The key id is public; the token itself never goes to the log.
            log.warning(
                "rejected a call with an invalid API key",
                extra={
                    "event": "auth_rejected",
                    "key_id": parts[0] if parts else None,
                    "reason": "malformed"
                    if parts is None
                    else "unknown, revoked or wrong secret",
                },
            )
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{named} is not valid: it is malformed, unknown or revoked; "
                "list keys with `ingestd keys list` or create one with "
                "`ingestd keys create --user USER`",
                reason="API_KEY_INVALID",
            )
            raise AssertionError("unreachable")
        if requested_user and requested_user != principal.user_id:
            if not principal.is_admin:
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"key {principal.key_id} belongs to user {principal.user_id!r}; only "
                    f"admin keys may act for another user through {USER_METADATA_KEY}",
                    reason="IMPERSONATION_DENIED",
                )
            user = await self._checked_user(context, str(requested_user))
            principal = dataclasses.replace(principal, user_id=user)
        return principal

    async def _checked_user(self, context: grpc.aio.ServicerContext, user: str) -> str:
        try:
            return check_user_id(user)
        except ValueError as exc:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid {USER_METADATA_KEY} metadata: {exc}",
                reason="INVALID_USER_ID",
            )
            raise AssertionError("unreachable") from None

    async def _check_rate(
        self, context: grpc.aio.ServicerContext, principal: Principal
    ) -> None:
        subject = principal.key_id or f"user:{principal.user_id}"
        for item in self._limits:
            if self._limiter.hit(item, subject):
                continue
            stats = self._limiter.get_window_stats(item, subject)
            wait = max(0.0, stats.reset_time - time.time())
            await abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit of {item} for {_subject_name(principal)} exceeded; retry in "
                f"{wait:.1f} s, or raise INGESTD_RATE_LIMIT ({self._settings.rate_limit})",
                reason="RATE_LIMITED",
            )


def _subject_name(principal: Principal) -> str:
    if principal.key_id:
        return f"key {principal.key_id}"
    return f"user {principal.user_id}"


def _bearer_token(value: Any) -> str | None:
    if not value:
        return None
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        # Treated as no key, so the caller gets the message that explains
        # how to send one.
        return None
    return token.strip()


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    request_id: str,
    authorize: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
) -> grpc.RpcMethodHandler:
    async def prepare(context: grpc.aio.ServicerContext) -> None:
        request_id_var.set(request_id)
        await authorize(context)

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
            exc,
            (
                OSError,
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
            ),
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
    # Access level of each method, by full method name. Unlisted methods of
    # the service need a valid key (Access.USER).
    access: Mapping[str, Access] = field(default_factory=dict)


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
        self._health_task: asyncio.Future[None] | None = None

    def start_background(self) -> None:
        if self.parts.worker is not None and self.runtime.settings.worker_enabled:
            self._tasks.append(
                asyncio.create_task(self.parts.worker.run(), name=f"{self.name}-worker")
            )
        for factory in self.parts.background:
            self._tasks.append(
                asyncio.create_task(factory(), name=f"{self.name}-background")
            )
        for task in self._tasks:
            task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopped.is_set():
            return
        error = task.exception()
        # The worker and archiver loop until shutdown. One that ends early
        # leaves the process unable to do its work, so health turns
        # NOT_SERVING and an orchestrator can replace the process.
        log.error(
            "background task %s ended unexpectedly",
            task.get_name(),
            exc_info=error,
            extra={
                "event": "background_task_died",
                "service": self.name,
                "reason": f"{type(error).__name__}: {error}" if error else "returned",
            },
        )
        self._health_task = asyncio.ensure_future(self._set_not_serving())

    async def _set_not_serving(self) -> None:
        for service_name in ["", *self.parts.service_names]:
            await self.health.set(
                service_name, health_pb2.HealthCheckResponse.NOT_SERVING
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


class StartupError(RuntimeError):
    """Configuration error that stops a service at startup; the message names the fix."""


async def check_keys_configured(runtime: Runtime, name: str) -> None:
    """Raise StartupError when authentication is on and no API key exists.

    Without a key no client could call the service, so it stops at once
    with a message on how to create one.
    """
    if runtime.settings.allow_unauthenticated:
        log.warning(
            "authentication is off: calls without an API key are accepted as admin",
            extra={"event": "auth_disabled", "service": name},
        )
        return
    async with runtime.pool.acquire() as connection:
        active = await count_active_keys(connection)
    if active == 0:
        await runtime.close()
        raise StartupError(
            f"the {name} service needs at least one API key in the database, and there "
            "is none; create one with `ingestd keys create --user USER --admin`, or set "
            "INGESTD_ALLOW_UNAUTHENTICATED=true for local development only"
        )


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
    await check_keys_configured(runtime, name)
    parts = await build(runtime)
    options = [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        interceptors=[
            CallContextInterceptor(
                settings,
                KeyVerifier(runtime.pool, cache_seconds=settings.auth_cache_seconds),
                parts.access,
            )
        ],
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
    address = f"{settings.host}:{port}"
    if settings.tls_enabled:
        bound = server.add_secure_port(address, server_credentials(settings))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        await runtime.close()
        raise StartupError(
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
    try:
        settings = get_settings()
    except SettingsError as exc:
        # Logging is configured from the settings, so this goes to stderr.
        print(f"the {name} service cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)

    async def main() -> None:
        try:
            running = await start_service(
                name, port_of(settings), build, settings=settings
            )
        except StartupError as exc:
            log.error("%s", exc, extra={"event": "startup_failed", "service": name})
            raise SystemExit(2) from None
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
