"""The CLI's blocking gRPC client against scripted server responses.

grpcio-testing stands in for the gateway here: the test takes each call the
CLI makes, checks its requests, and answers it, without any server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import grpc_testing
import pytest
from click.testing import CliRunner
from google.rpc import error_details_pb2, status_pb2

from ingestd.cli.client import UPLOAD_CHUNK_BYTES
from ingestd.cli.main import (
    cli,
    exit_description,
    job_status_values,
    print_search,
    read_pages,
    upload_paths,
)
from ingestd.v1 import resources_pb2, search_service_pb2
from ingestd.v1 import upload_service_pb2 as upload_pb

UPLOAD_SERVICE = upload_pb.DESCRIPTOR.services_by_name["UploadService"]
SEARCH_SERVICE = search_service_pb2.DESCRIPTOR.services_by_name["SearchService"]
UPLOAD = UPLOAD_SERVICE.methods_by_name["Upload"]
SEARCH = SEARCH_SERVICE.methods_by_name["Search"]


@pytest.fixture
def channel() -> grpc_testing.Channel:
    return grpc_testing.channel(
        [UPLOAD_SERVICE, SEARCH_SERVICE], grpc_testing.strict_real_time()
    )


def run_in_thread(
    function: Callable[[], Any],
) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # SystemExit from the CLI included
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_upload_streams_metadata_then_chunks(channel, tmp_path: Path, capsys) -> None:
    path = tmp_path / "notes.md"
    size = UPLOAD_CHUNK_BYTES * 2 + 100
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    path.write_bytes(data)
    thread, outcome = run_in_thread(
        lambda: upload_paths(channel, "alice", (path,), wait=False)
    )
    metadata, rpc = channel.take_stream_unary(UPLOAD)
    requests = [rpc.take_request() for _ in range(4)]
    rpc.requests_closed()
    rpc.terminate(
        upload_pb.UploadResponse(
            document=resources_pb2.Document(document_id="doc-1"),
            job=resources_pb2.Job(
                job_id="job-1", status=resources_pb2.JOB_STATUS_UPLOADED
            ),
        ),
        (),
        grpc.StatusCode.OK,
        "",
    )
    thread.join(timeout=10)

    assert "error" not in outcome
    assert dict(metadata)["x-ingestd-user"] == "alice"
    assert requests[0].WhichOneof("payload") == "metadata"
    assert requests[0].metadata.filename == "notes.md"
    assert requests[0].metadata.content_type == "text/markdown"
    assert requests[0].metadata.size_bytes == len(data)
    assert [len(r.chunk) for r in requests[1:]] == [
        UPLOAD_CHUNK_BYTES,
        UPLOAD_CHUNK_BYTES,
        len(data) - 2 * UPLOAD_CHUNK_BYTES,
    ]
    assert b"".join(r.chunk for r in requests[1:]) == data
    jobs, failures = outcome["value"]
    assert [job.job_id for job in jobs] == ["job-1"]
    assert failures == 0
    assert "job job-1" in capsys.readouterr().out


def accept_upload(channel, job_id: str) -> None:
    """Complete the next Upload stream with a job of the given id."""
    _, accepted = channel.take_stream_unary(UPLOAD)
    accepted.terminate(
        upload_pb.UploadResponse(job=resources_pb2.Job(job_id=job_id)),
        (),
        grpc.StatusCode.OK,
        "",
    )


def test_upload_rejected_file_skips_to_next(channel, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "archive.zip"
    good = tmp_path / "good.txt"
    bad.write_bytes(b"PK\x03\x04zip")
    good.write_bytes(b"plain text")
    thread, outcome = run_in_thread(
        lambda: upload_paths(channel, None, (bad, good), wait=False)
    )
    _, rejected = channel.take_stream_unary(UPLOAD)
    rejected.terminate(
        None, (), grpc.StatusCode.INVALID_ARGUMENT, "unsupported file type: ZIP archive"
    )
    accept_upload(channel, "job-2")
    thread.join(timeout=10)

    assert "error" not in outcome
    jobs, failures = outcome["value"]
    assert [job.job_id for job in jobs] == ["job-2"]
    assert failures == 1
    assert "ZIP archive" in capsys.readouterr().err


def reject_upload(channel, reason: str, message: str) -> None:
    """End the next Upload stream with RESOURCE_EXHAUSTED and an ErrorInfo reason."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason))
    trailer = (("grpc-status-details-bin", status.SerializeToString()),)
    _, rpc = channel.take_stream_unary(UPLOAD)
    rpc.terminate(None, trailer, code, message)


def start_upload(channel, path: Path, content: bytes) -> tuple:
    """Write a file and upload it from a thread, without waiting for its job."""
    path.write_bytes(content)
    return run_in_thread(lambda: upload_paths(channel, None, (path,), wait=False))


def test_upload_waits_out_the_rate_limit(channel, tmp_path: Path) -> None:
    thread, outcome = start_upload(channel, tmp_path / "notes.md", b"# Notes\n")
    reject_upload(channel, "RATE_LIMITED", "slow down")
    accept_upload(channel, "job-3")
    thread.join(timeout=10)

    assert "error" not in outcome
    jobs, failures = outcome["value"]
    assert [job.job_id for job in jobs] == ["job-3"]
    assert failures == 0


def test_upload_too_large_is_not_tried_again(channel, tmp_path: Path, capsys) -> None:
    thread, outcome = start_upload(channel, tmp_path / "big.txt", b"big")
    reject_upload(channel, "UPLOAD_TOO_LARGE", "too big")
    thread.join(timeout=10)

    assert isinstance(outcome["error"], SystemExit)
    assert "too big" in capsys.readouterr().err


def test_upload_all_rejected_exits_1(channel, tmp_path: Path) -> None:
    bad = tmp_path / "program"
    bad.write_bytes(b"\x7fELF")
    thread, outcome = run_in_thread(
        lambda: upload_paths(channel, None, (bad,), wait=False)
    )
    _, rpc = channel.take_stream_unary(UPLOAD)
    rpc.terminate(None, (), grpc.StatusCode.INVALID_ARGUMENT, "ELF executable")
    thread.join(timeout=10)

    assert isinstance(outcome["error"], SystemExit)
    assert outcome["error"].code == 1


def test_search_prints_ranked_results(channel, capsys) -> None:
    thread, outcome = run_in_thread(lambda: print_search(channel, "bob", "leases", 3))
    metadata, request, rpc = channel.take_unary_unary(SEARCH)
    rpc.terminate(
        search_service_pb2.SearchResponse(
            results=[
                search_service_pb2.SearchResult(
                    filename="paper.pdf",
                    score=0.8123,
                    text="Leases   are\nrenewed by heartbeats.",
                    page_start=3,
                    page_end=4,
                    heading_path=["**Design**"],
                ),
                search_service_pb2.SearchResult(
                    filename="notes.md",
                    score=0.5,
                    text="## Notes\n\nSee **the** [guide](https://example.com/guide).",
                ),
            ]
        ),
        (),
        grpc.StatusCode.OK,
        "",
    )
    thread.join(timeout=10)
    output = capsys.readouterr().out

    assert "error" not in outcome
    assert request.query == "leases"
    assert request.top_k == 3
    assert dict(metadata)["x-ingestd-user"] == "bob"
    assert "1. paper.pdf" in output
    assert "score 0.812" in output
    assert "page 3-4, Design" in output
    assert "Leases are renewed by heartbeats." in output
    # Snippets show a chunk's text without its Markdown markup.
    assert "Notes See the guide." in output
    assert "https://example.com" not in output
    assert output.index("paper.pdf") < output.index("notes.md")


def search_with_one_result(channel, text: str) -> None:
    """Run print_search against a server that returns one result with text."""
    thread, _ = run_in_thread(lambda: print_search(channel, None, "x", 5))
    _, _, rpc = channel.take_unary_unary(SEARCH)
    result = search_service_pb2.SearchResult(filename="a.md", score=0.5, text=text)
    rpc.terminate(
        search_service_pb2.SearchResponse(results=[result]),
        (),
        grpc.StatusCode.OK,
        "",
    )
    thread.join(timeout=10)


def test_search_snippet_control_characters_replaced(channel, capsys) -> None:
    # The server's text is not trusted: an escape sequence or a direction
    # override would reach the terminal.
    search_with_one_result(channel, "red \x1b[31mtext\u202e end")
    output = capsys.readouterr().out

    assert "red ?[31mtext? end" in output
    assert "\x1b" not in output
    assert "\u202e" not in output


def test_search_unavailable_suggests_up(channel, capsys) -> None:
    thread, outcome = run_in_thread(lambda: print_search(channel, None, "x", 5))
    _, _, rpc = channel.take_unary_unary(SEARCH)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "failed to connect")
    thread.join(timeout=10)

    assert isinstance(outcome["error"], SystemExit)
    assert "ingestd up" in capsys.readouterr().err


def test_status_failed_means_every_failed_status() -> None:
    values = job_status_values(("failed", "complete"))
    names = [resources_pb2.JobStatus.Name(value) for value in values]
    assert names == [
        "JOB_STATUS_FAILED_PARSE",
        "JOB_STATUS_FAILED_CHUNKING",
        "JOB_STATUS_FAILED_EMBEDDING",
        "JOB_STATUS_COMPLETE",
    ]


def test_unknown_status_exits_with_choices(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        job_status_values(("failed", "broken"))
    assert exited.value.code == 1
    error = " ".join(capsys.readouterr().err.split())
    assert "unknown status 'broken'" in error
    assert "failed_embedding" in error
    assert "or failed for all three failed statuses" in error


@pytest.mark.parametrize("command", ["jobs", "documents"])
def test_limit_below_one_rejected(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--limit", "0"])
    assert result.exit_code == 2
    assert "0 is not in the range x>=1" in result.output


@pytest.mark.parametrize(
    ("limit", "expected_items", "expected_calls"),
    [
        (10, ["a", "b", "c", "d", "e"], [(10, ""), (8, "t1"), (6, "t2")]),
        (3, ["a", "b", "c"], [(3, ""), (1, "t1")]),
        (2, ["a", "b"], [(2, "")]),
    ],
)
def test_read_pages_follows_tokens(
    limit: int, expected_items: list[str], expected_calls: list[tuple[int, str]]
) -> None:
    # Each page contains at most two items, as if the server's page size were 2.
    pages = {"": (["a", "b"], "t1"), "t1": (["c", "d"], "t2"), "t2": (["e"], "")}
    calls = []

    def fetch(size: int, token: str) -> SimpleNamespace:
        calls.append((size, token))
        items, following = pages[token]
        return SimpleNamespace(items=items[:size], next_page_token=following)

    assert read_pages(fetch, "items", limit) == expected_items
    assert calls == expected_calls


def test_piped_snippet_on_one_line(channel, capsys) -> None:
    search_with_one_result(channel, "word " * 100)
    lines = capsys.readouterr().out.splitlines()

    snippet = [line for line in lines if line.startswith("   word")]
    assert len(snippet) == 1
    assert snippet[0].endswith("word…")


def test_no_results_hint_only_above_minus_one(channel, capsys) -> None:
    for min_score, hinted in ((0.5, True), (-1.0, False)):
        thread, _ = run_in_thread(
            lambda min_score=min_score: print_search(channel, None, "x", 5, min_score)
        )
        _, _, rpc = channel.take_unary_unary(SEARCH)
        rpc.terminate(search_service_pb2.SearchResponse(), (), grpc.StatusCode.OK, "")
        thread.join(timeout=10)
        output = " ".join(capsys.readouterr().out.split())

        assert f"no results with a score of at least {min_score}" in output
        assert ("try --min-score -1" in output) is hinted


def test_exit_description_names_signal() -> None:
    assert exit_description(2) == "exited with status 2"
    assert exit_description(-9) == "was killed by SIGKILL"
