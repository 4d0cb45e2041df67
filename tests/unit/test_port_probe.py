"""The port check of `ingestd up`: a listening port is in use, a TIME-WAIT port is free."""

from __future__ import annotations

import socket

import pytest

from ingestd.cli.supervisor import check_ports_free
from shared.config import Settings


def settings_on(port: int) -> Settings:
    # Only the gateway's port is under test; the others are left to the OS.
    return Settings(
        gateway_port=port, chunker_port=0, embedder_port=0, allow_unauthenticated=True
    )


def test_listening_port_is_in_use() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} .* already in use"):
            check_ports_free(settings_on(port))


def test_port_left_in_time_wait_is_free() -> None:
    # The server side closes first, as a stopped service does, so its end of
    # the connection stays in TIME-WAIT on the port.
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()
    server.close()
    client.recv(1)
    client.close()

    check_ports_free(settings_on(port))
