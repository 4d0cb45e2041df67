"""Conversions between database rows and ingestd.v1 messages."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ingestd.v1 import resources_pb2
from shared.jobs import Status
from shared.worker import BaseWorker


def timestamp(value: datetime | None) -> Timestamp | None:
    """Convert an aware datetime to a Timestamp."""
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def status_to_proto(status: str) -> resources_pb2.JobStatus.ValueType:
    """Map a status string to its JobStatus enum value."""
    return resources_pb2.JobStatus.Value(f"JOB_STATUS_{status.upper()}")


def status_from_proto(value: int) -> Status:
    """Map a JobStatus enum value to its status string.

    Raises ValueError for JOB_STATUS_UNSPECIFIED and for numbers that name
    no status.
    """
    statuses = resources_pb2.JobStatus.DESCRIPTOR.values
    if value == resources_pb2.JOB_STATUS_UNSPECIFIED or all(
        status.number != value for status in statuses
    ):
        known = ", ".join(
            status.name
            for status in statuses
            if status.name != "JOB_STATUS_UNSPECIFIED"
        )
        raise ValueError(f"status {value} is not a job status; use one of {known}")
    name = resources_pb2.JobStatus.Name(value)
    return Status(name.removeprefix("JOB_STATUS_").lower())


def job_to_proto(row: Mapping[str, Any]) -> resources_pb2.Job:
    """Build a Job message from an upload_jobs row."""
    progress = row["progress"] or {}
    job = resources_pb2.Job(
        job_id=str(row["job_id"]),
        document_id=str(row["document_id"]),
        user_id=row["user_id"],
        status=status_to_proto(row["status"]),
        progress=resources_pb2.JobProgress(
            chunks_total=int(progress.get("chunks_total", 0)),
            chunks_done=int(progress.get("chunks_done", 0)),
            embeds_total=int(progress.get("embeds_total", 0)),
            embeds_done=int(progress.get("embeds_done", 0)),
        ),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        retry_count=row["retry_count"],
        chunker_name=row["chunker_name"],
        chunker_version=row["chunker_version"],
        embed_model=row["embed_model"],
        embed_version=row["embed_version"],
        leased_by=row["leased_by"] or "",
        run_after=timestamp(row["run_after"]),
        created_at=timestamp(row["created_at"]),
        updated_at=timestamp(row["updated_at"]),
    )
    error = row["last_error"]
    if error:
        job.last_error.CopyFrom(
            resources_pb2.JobError(
                code=str(error.get("code", "")),
                message=str(error.get("message", "")),
                stage=str(error.get("stage", "")),
                retry_count=int(error.get("retry_count", 0)),
            )
        )
        if error.get("at"):
            job.last_error.at.FromDatetime(datetime.fromisoformat(str(error["at"])))
    return job


def document_to_proto(row: Mapping[str, Any]) -> resources_pb2.Document:
    """Build a Document message from a documents row."""
    return resources_pb2.Document(
        document_id=str(row["document_id"]),
        user_id=row["user_id"],
        filename=row["filename"],
        content_type=row["content_type"],
        declared_content_type=row["declared_content_type"],
        byte_size=row["byte_size"],
        raw_sha256=row["raw_sha256"],
        parsed_sha256=row["parsed_sha256"] or "",
        page_count=row["page_count"] or 0,
        encoding=row["encoding"] or "",
        created_at=timestamp(row["created_at"]),
    )


async def worker_status_to_proto(worker: BaseWorker) -> resources_pb2.WorkerStatus:
    """Describe a worker's state and its stage's queue."""
    return resources_pb2.WorkerStatus(
        worker_id=worker.worker_id,
        stage=worker.spec.name,
        accepting_work=worker.accepting_work,
        active_job_ids=[str(job_id) for job_id in worker.active_job_ids],
        max_concurrent_jobs=worker.settings.max_concurrent_jobs,
        jobs_succeeded=worker.counters.succeeded,
        jobs_failed=worker.counters.failed,
        jobs_retried=worker.counters.retried,
        leases_lost=worker.counters.leases_lost,
        queue_depth=await worker.queue_depth(),
        started_at=timestamp(worker.counters.started_at),
    )
