"""Both log formats carry the request id that error messages ask users to quote."""

from __future__ import annotations

import json
import logging

import pytest

from shared.logging import JsonFormatter, TextFormatter, request_id_var


def record() -> logging.LogRecord:
    entry = logging.LogRecord(
        "ingestd.test", logging.ERROR, __file__, 1, "boom", (), None
    )
    entry.event = "rpc_failed"
    return entry


@pytest.fixture
def request_id():
    token = request_id_var.set("req-42")
    yield "req-42"
    request_id_var.reset(token)


def test_text_format_shows_request_id(request_id: str) -> None:
    line = TextFormatter().format(record())
    assert f"request_id={request_id}" in line
    assert "event=rpc_failed" in line


def test_json_format_shows_request_id(request_id: str) -> None:
    payload = json.loads(JsonFormatter().format(record()))
    assert payload["request_id"] == request_id
    assert payload["event"] == "rpc_failed"


def test_text_format_without_request() -> None:
    assert "request_id" not in TextFormatter().format(record())
