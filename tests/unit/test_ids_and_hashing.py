"""Deterministic ids and content hashes."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest

from ingestd.v1 import resources_pb2
from shared import ids
from shared.hashing import chunk_sha, normalize_text, parsed_sha256, vector_sha
from shared.proto_convert import status_from_proto

NAMESPACE = uuid.UUID("6c8a1e6e-1f0b-4aa8-9f0a-1a7c2e6f2b42")


def test_chunk_id_matches_uuid5_of_canonical_string() -> None:
    document = uuid.UUID("0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9")
    expected = uuid.uuid5(NAMESPACE, f"{document}:markdown-splitter:v-ABC:7".lower())
    assert ids.chunk_id(document, "markdown-splitter", "v-ABC", 7) == expected


def test_document_id_depends_on_user() -> None:
    assert ids.document_id("alice", "ab" * 32) != ids.document_id("Alice", "ab" * 32)


def test_chunk_sha_normalizes_before_hashing() -> None:
    assert chunk_sha("Cafe\u0301 text\r\nline  \n") == chunk_sha("Café text\nline")
    assert chunk_sha("abc") == hashlib.sha256(b"abc").hexdigest()


def test_normalize_text_removes_controls_and_cr() -> None:
    assert normalize_text("a\x00b\r\nc\rd  \n\n") == "ab\nc\nd"


def test_parsed_sha256_uses_normalized_text() -> None:
    assert parsed_sha256("x\r\n") == parsed_sha256("x")


def test_vector_sha_uses_little_endian_float32() -> None:
    vector = [0.5, -1.0, 2.25]
    expected = hashlib.sha256(np.asarray(vector, dtype="<f4").tobytes()).hexdigest()
    assert vector_sha(vector) == expected
    assert vector_sha(np.asarray(vector, dtype=np.float64)) == expected


def test_check_user_id_accepts_safe_names() -> None:
    assert ids.check_user_id("team-a.user_1") == "team-a.user_1"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x" * 65])
def test_check_user_id_rejects_path_characters(bad: str) -> None:
    with pytest.raises(ValueError, match="user id"):
        ids.check_user_id(bad)


def test_parse_uuid_error_cuts_long_values() -> None:
    with pytest.raises(ValueError, match="cut to its first 64 characters") as error:
        ids.parse_uuid("x" * 100_000, "job_id")
    assert len(str(error.value)) < 400
    assert "job_id" in str(error.value)


@pytest.mark.parametrize("value", [0, 999, -1])
def test_status_from_proto_rejects_non_statuses(value: int) -> None:
    with pytest.raises(ValueError, match=f"status {value} is not a job status"):
        status_from_proto(value)


def test_status_from_proto_maps_known_status() -> None:
    assert status_from_proto(resources_pb2.JOB_STATUS_COMPLETE) == "complete"
