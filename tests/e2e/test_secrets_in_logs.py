"""No API key and no database password reaches a service log, even on errors."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest

from ingestd.v1 import search_service_pb2, search_service_pb2_grpc
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared import auth
from shared.config import Settings
from tests.conftest import upload_messages
from tests.fault.conftest import Cluster, wait_terminal

pytestmark = pytest.mark.e2e


def with_password(url: str, role: str, password: str) -> str:
    # Embedded URLs look like postgresql://postgres:@/dbname?host=/socket/dir
    scheme, _, rest = url.partition("://")
    _, _, location = rest.partition("@")
    return f"{scheme}://{role}:{password}@{location}"


async def test_full_run_logs_no_secrets(settings: Settings, tmp_path: Path) -> None:
    assert settings.database_url is not None
    password = "pw-" + secrets.token_hex(12)
    role = "app_" + uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(settings.database_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
        _, user_key = await auth.create_key(admin, "sailor")
        bad_id, _ = await auth.create_key(admin, "sailor")
    finally:
        await admin.close()
    database_url = with_password(settings.database_url, role, password)
    # A key with a real id and a wrong secret, the shape a leaked key has.
    wrong_secret = f"ingestd_{bad_id}_" + secrets.token_urlsafe(32)

    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env.update(
        {
            "INGESTD_DATABASE_URL": database_url,
            "INGESTD_DATA_DIR": str(settings.data_dir),
            "INGESTD_LOG_FORMAT": "json",
            "INGESTD_LOG_LEVEL": "DEBUG",
            "INGESTD_LEASE_SECONDS": "4",
            "INGESTD_POLL_INTERVAL_SECONDS": "1",
            "INGESTD_EMBED_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    folder = tmp_path / "logs"
    folder.mkdir()
    cluster = Cluster(settings, folder, env)
    try:
        gateway, _, _ = await cluster.start_all()
        metadata = (("authorization", f"Bearer {user_key}"),)
        async with cluster.channel() as channel:
            uploads = upload_grpc.UploadServiceStub(channel)
            response = await uploads.Upload(
                upload_messages(b"# Log\n\nThe ship's log is kept in ink.\n", "log.md"),
                metadata=metadata,
            )
            connection = await asyncpg.connect(settings.database_url)
            try:
                rows = await wait_terminal(connection, [response.job.job_id])
                assert rows[0]["status"] == "complete"
                search = search_service_pb2_grpc.SearchServiceStub(channel)
                await search.Search(
                    search_service_pb2.SearchRequest(query="ship log ink"),
                    metadata=metadata,
                )
                # Error paths: a wrong secret, a bearer token that is not a
                # key at all, and dropped database connections.
                for token in (wrong_secret, "not-a-key-" + password):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await uploads.ListJobs(
                            upload_pb.ListJobsRequest(),
                            metadata=(("authorization", f"Bearer {token}"),),
                        )
                await connection.execute(
                    """
                    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                    WHERE usename = $1
                    """,
                    role,
                )
                await asyncio.sleep(2)
                await uploads.ListJobs(upload_pb.ListJobsRequest(), metadata=metadata)
            finally:
                await connection.close()
        for process in cluster.processes:
            process.signal(signal.SIGTERM)
        for process in cluster.processes:
            await process.wait_exit()
        assert gateway.events("service_stopped")
    finally:
        cluster.stop_all()

    logs = "\n".join(path.read_text(errors="replace") for path in folder.glob("*.log"))
    assert "listener_connected" in logs
    assert f'"key_id": "{bad_id}"' in logs
    assert password not in logs
    assert user_key not in logs
    # The secret is everything after "ingestd_<12 hex digits>_".
    assert user_key[21:] not in logs
    assert wrong_secret[21:] not in logs
