"""Run the three services as child processes, for ``ingestd up`` and ``demo``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.config import Settings
from shared.db import resolve_database_url
from shared.tls import channel_credentials

log = logging.getLogger(__name__)

SERVICES = ("embedder", "chunker", "gateway")


@dataclass
class Child:
    """One service process."""

    name: str
    port: int
    process: subprocess.Popen[bytes]


def prepare_database(settings: Settings) -> str:
    """Start the embedded database if needed, migrate it, and return its URL."""
    from migrations import upgrade

    url = resolve_database_url(settings)
    upgrade(url)
    return url


def port_of(settings: Settings, name: str) -> int:
    return int(getattr(settings, f"{name}_port"))


def check_ports_free(settings: Settings) -> None:
    """Raise RuntimeError if a service port is already taken.

    Without this check, the health probe of a new service would reach
    whatever process already listens on the port, and report success.
    """
    for name in SERVICES:
        port = port_of(settings, name)
        with socket.socket() as probe:
            # A service stopped a moment ago leaves TIME-WAIT sockets on its
            # port. SO_REUSEADDR lets the probe bind beside them, as the gRPC
            # server itself does. On Linux the bind still fails while anything
            # listens on the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((settings.host, port))
            except OSError:
                raise RuntimeError(
                    f"port {port} on {settings.host} for the {name} is already in use, "
                    f"perhaps by another ingestd; stop it or set INGESTD_{name.upper()}_PORT"
                ) from None


def start_services(
    settings: Settings, database_url: str, log_dir: Path | None = None
) -> list[Child]:
    """Start every service with the database URL set, and return them."""
    check_ports_free(settings)
    env = dict(os.environ)
    env["INGESTD_DATABASE_URL"] = database_url
    env.setdefault("INGESTD_LOG_FORMAT", "text")
    children = []
    for name in SERVICES:
        stderr = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            stderr = (log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=env,
            stdout=stderr,
            stderr=stderr,
            # Ctrl-C in the terminal reaches only the supervisor, which then
            # stops the children in order with SIGTERM.
            start_new_session=True,
        )
        children.append(Child(name, port_of(settings, name), process))
    return children


def _health_channel(settings: Settings, target: str) -> grpc.Channel:
    if settings.tls_enabled:
        return grpc.secure_channel(target, channel_credentials(settings.tls_ca_file))
    return grpc.insecure_channel(target)


def wait_until_serving(
    settings: Settings, children: list[Child], timeout_seconds: float = 180
) -> None:
    """Block until every child reports SERVING, or raise RuntimeError."""
    deadline = time.monotonic() + timeout_seconds
    for child in children:
        target = f"{settings.host}:{child.port}"
        with _health_channel(settings, target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if child.process.poll() is not None:
                    raise RuntimeError(
                        f"the {child.name} service exited with status {child.process.returncode}; "
                        "see its log output above"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the {child.name} service at {target} did not start in time"
                    )
                time.sleep(0.5)


def stop_services(children: list[Child], grace_seconds: float) -> None:
    """SIGTERM every child, wait for the drain, then SIGKILL stragglers."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds + 10
    for child in children:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            child.process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", child.name)
            child.process.kill()
            child.process.wait()
