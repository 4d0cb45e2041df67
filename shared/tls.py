"""TLS credentials for the servers and for every client of them."""

from __future__ import annotations

from pathlib import Path

import grpc

from shared.config import Settings


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {setting} {path}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """Credentials that make a server present tls_cert_file."""
    assert settings.tls_cert_file is not None
    assert settings.tls_key_file is not None
    key = _read(settings.tls_key_file, "INGESTD_TLS_KEY_FILE")
    chain = _read(settings.tls_cert_file, "INGESTD_TLS_CERT_FILE")
    return grpc.ssl_server_credentials([(key, chain)])


def channel_credentials(ca_file: Path | None) -> grpc.ChannelCredentials:
    """Credentials that trust the CAs in ca_file, or the system's when None."""
    roots = _read(ca_file, "INGESTD_TLS_CA_FILE") if ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=roots)
