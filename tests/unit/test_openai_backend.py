"""OpenAICompatibleBackend against a local OpenAI-compatible HTTP server.

Every case sends real HTTP requests to tests.fault.openai_server on a
loopback port, and checks which error each status or malformed response
turns into.
"""

from __future__ import annotations

import email.utils
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from services.embedder.openai_api import (
    MAX_RETRY_AFTER_SECONDS,
    OpenAICompatibleBackend,
    parse_retry_after,
)
from shared.errors import PermanentError, TransientError
from tests.fault.openai_server import DIMENSIONS, EmbeddingsServer, Reply, embedding_for

TEXTS = ["first chunk of text", "second chunk of text", "third chunk of text"]
NOW = datetime(2030, 5, 17, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def server() -> Iterator[EmbeddingsServer]:
    with EmbeddingsServer() as running:
        yield running


def make_backend(server: EmbeddingsServer, **options) -> OpenAICompatibleBackend:
    settings = {
        "base_url": server.base_url,
        "model": server.model,
        "dimensions": DIMENSIONS,
        "max_tokens": 256,
        "timeout_seconds": 5.0,
    }
    settings.update(options)
    return OpenAICompatibleBackend(**settings)


def http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment, usegmt=True)


# parse_retry_after -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (" 30 ", 30.0),
    ],
)
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) == expected


def test_retry_after_future_date() -> None:
    value = http_date(NOW + timedelta(seconds=45))
    assert parse_retry_after(value, now=NOW.timestamp()) == 45.0


@pytest.mark.parametrize(
    "value",
    [
        "Fri, 17 May 2030 12:00:45 GMT",
        "Friday, 17-May-30 12:00:45 GMT",
        "Fri May 17 12:00:45 2030",
    ],
    ids=["imf-fixdate", "rfc850", "asctime"],
)
def test_retry_after_date_formats(value: str) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) == 45.0


def test_retry_after_past_date() -> None:
    value = http_date(NOW - timedelta(minutes=5))
    assert parse_retry_after(value, now=NOW.timestamp()) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "soon",
        "2 seconds",
        "2, 3",
        "-1",
        "-0.5",
        "nan",
        "inf",
        "1e400",
        "Fri, 32 May 2030 12:00:00 GMT",
        # The year overflows a C long inside the standard library's parser.
        "Fri, 17 May 10000000000000000000 12:00:00 GMT",
    ],
)
def test_retry_after_invalid(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW.timestamp()) is None


# Successful requests ---------------------------------------------------------


def test_embed_sends_openai_request(server: EmbeddingsServer) -> None:
    backend = make_backend(server)
    vectors = backend.embed(TEXTS)
    backend.close()

    assert vectors.shape == (len(TEXTS), DIMENSIONS)
    assert vectors.dtype == np.float32
    for row, text in zip(vectors, TEXTS, strict=True):
        assert np.allclose(row, embedding_for(text), atol=1e-6)
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == "/v1/embeddings"
    assert request.body == {
        "model": server.model,
        "input": TEXTS,
        "encoding_format": "float",
        "dimensions": DIMENSIONS,
    }
    assert request.authorization is None


def test_embed_sends_bearer_key(server: EmbeddingsServer) -> None:
    server.api_key = "sk-unit-test-key"
    backend = make_backend(server, api_key="sk-unit-test-key")
    backend.embed(TEXTS[:1])
    backend.close()

    (request,) = server.requests
    assert request.authorization == "Bearer sk-unit-test-key"
    assert request.status == 200


def test_embed_omits_dimensions_field(server: EmbeddingsServer) -> None:
    backend = make_backend(server, send_dimensions=False)
    backend.embed(TEXTS[:1])
    backend.close()

    (request,) = server.requests
    assert "dimensions" not in request.body


def test_embed_orders_by_index(server: EmbeddingsServer) -> None:
    data = [
        {"object": "embedding", "index": index, "embedding": embedding_for(text)}
        for index, text in enumerate(TEXTS)
    ]
    body = {
        "object": "list",
        "data": list(reversed(data)),
        "model": server.model,
        "usage": {"prompt_tokens": 12, "total_tokens": 12},
    }
    server.script(Reply(body=json.dumps(body).encode()))
    backend = make_backend(server)
    vectors = backend.embed(TEXTS)
    backend.close()

    for row, text in zip(vectors, TEXTS, strict=True):
        assert np.allclose(row, embedding_for(text), atol=1e-6)


def test_embed_normalizes_vectors(server: EmbeddingsServer) -> None:
    long_vector = [2.0] * DIMENSIONS
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": long_vector}],
        "model": server.model,
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    server.script(Reply(body=json.dumps(body).encode()))
    backend = make_backend(server)
    vectors = backend.embed(TEXTS[:1])
    backend.close()

    assert np.isclose(np.linalg.norm(vectors[0]), 1.0)


# Error statuses --------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_error_is_permanent(server: EmbeddingsServer, status: int) -> None:
    server.script(Reply.error(status))
    backend = make_backend(server)
    with pytest.raises(PermanentError) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert caught.value.code == "embedding_request_rejected"
    assert f"HTTP {status}" in caught.value.message
    assert len(server.requests) == 1


def test_unauthorized_names_key_setting(server: EmbeddingsServer) -> None:
    server.api_key = "sk-expected"
    backend = make_backend(server, api_key="sk-wrong")
    with pytest.raises(PermanentError) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert "INGESTD_EMBED_API_KEY" in caught.value.message
    assert "sk-wrong" not in caught.value.message


@pytest.mark.parametrize(
    ("status", "across_cut"),
    [(401, False), (503, False), (503, True)],
    ids=["401", "503", "503-key-across-cut"],
)
def test_echoed_key_is_redacted(
    server: EmbeddingsServer, status: int, across_cut: bool
) -> None:
    key = "sk-unit-secret-0123456789abcdef"
    lead = " Received API Key = "
    padding = 0
    if across_cut:
        # The server's body starts with this, and the backend keeps the
        # first 300 characters, so the key starts 10 characters before the cut.
        body_start = '{"error": {"message": "'
        padding = 300 - len(body_start) - len(lead) - 10
    message = "x" * padding + lead + key + ", not found."
    server.script(Reply.error(status, message=message))
    backend = make_backend(server, api_key=key)
    with pytest.raises((PermanentError, TransientError)) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert "[redacted]" in caught.value.message
    assert key not in caught.value.message
    assert key[:10] not in caught.value.message


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (408, "embedding_api_error"),
        (409, "embedding_api_error"),
        (429, "embedding_rate_limited"),
        (500, "embedding_api_error"),
        (502, "embedding_api_error"),
        (503, "embedding_api_error"),
    ],
)
def test_server_error_is_transient(
    server: EmbeddingsServer, status: int, code: str
) -> None:
    server.script(Reply.error(status))
    backend = make_backend(server)
    with pytest.raises(TransientError) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert caught.value.code == code
    assert f"HTTP {status}" in caught.value.message
    assert caught.value.retry_after_seconds is None


def test_rate_limit_carries_retry_after(server: EmbeddingsServer) -> None:
    server.script(Reply.error(429, retry_after="7"))
    backend = make_backend(server)
    with pytest.raises(TransientError) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert caught.value.retry_after_seconds == 7.0


def test_huge_retry_after_is_capped(server: EmbeddingsServer) -> None:
    server.script(Reply.error(429, retry_after="99999999999999999999"))
    backend = make_backend(server)
    with pytest.raises(TransientError) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert caught.value.retry_after_seconds == MAX_RETRY_AFTER_SECONDS


def test_unavailable_carries_retry_date(server: EmbeddingsServer) -> None:
    server.script(
        Reply.error(503, retry_after=http_date(datetime.now(UTC) + timedelta(hours=1)))
    )
    backend = make_backend(server)
    with pytest.raises(TransientError) as caught:
        backend.embed(TEXTS)
    backend.close()

    wait = caught.value.retry_after_seconds
    assert wait is not None
    # The date has whole seconds, and the request itself takes a moment.
    assert wait >= 3590
    assert wait <= 3600


def test_slow_server_times_out(server: EmbeddingsServer) -> None:
    server.script(Reply(delay_seconds=3))
    backend = make_backend(server, timeout_seconds=0.5)
    with pytest.raises(TransientError) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert caught.value.code == "embedding_api_timeout"


def test_closed_port_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port once the probe socket is closed.
    backend = OpenAICompatibleBackend(
        base_url=f"http://127.0.0.1:{port}/v1",
        model="any",
        dimensions=DIMENSIONS,
        max_tokens=256,
    )
    with pytest.raises(TransientError) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert caught.value.code == "embedding_api_unreachable"


# Malformed successful responses ----------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(Reply(missing_vectors=1), id="one-vector-short"),
        pytest.param(Reply(dimensions=DIMENSIONS - 1), id="383-dimensions"),
        pytest.param(Reply(first_value=float("nan")), id="nan"),
        pytest.param(Reply(first_value=1e300), id="float32-overflow"),
        pytest.param(Reply(first_value=float("inf")), id="infinity"),
        pytest.param(Reply(body=b"<html>busy</html>"), id="not-json"),
        pytest.param(Reply(body=b'{"object": "list"}'), id="no-data"),
        pytest.param(
            Reply(body=b'{"data": [{"index": 0, "embedding": "abc"}]}'), id="not-floats"
        ),
    ],
)
def test_malformed_vectors_are_transient(
    server: EmbeddingsServer, reply: Reply
) -> None:
    server.script(reply)
    backend = make_backend(server)
    with pytest.raises(TransientError) as caught:
        backend.embed(TEXTS)
    backend.close()

    assert caught.value.code == "invalid_embedding"
