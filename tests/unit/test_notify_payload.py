"""Job ids named by the two notification payload formats."""

from __future__ import annotations

from shared.notify import notified_job_ids


def test_notified_job_ids_single_job() -> None:
    payload = {"job_id": "a1", "status": "uploaded"}
    assert notified_job_ids(payload) == ["a1"]


def test_notified_job_ids_batched_hand_off() -> None:
    payload = {"job_ids": ["a1", "b2"], "status": "chunks_stored"}
    assert notified_job_ids(payload) == ["a1", "b2"]


def test_notified_job_ids_without_ids() -> None:
    assert notified_job_ids({"status": "uploaded"}) == []
