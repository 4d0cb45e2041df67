"""The whole pipeline with TLS on every service and API keys required."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme

from ingestd.v1 import resources_pb2, search_service_pb2, search_service_pb2_grpc
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared import auth
from shared.config import Settings
from shared.db import connect
from tests.conftest import REPO_ROOT, running_pipeline, upload_messages

pytestmark = pytest.mark.e2e

TEXT = b"# Harbor\n\nThe harbor master logs every ship that enters after sunset.\n"


def write_certificates(folder: Path) -> dict[str, Path]:
    """Issue a server certificate for 127.0.0.1 from a throwaway CA."""
    authority = trustme.CA()
    server = authority.issue_cert("127.0.0.1", "localhost")
    paths = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
    }
    authority.cert_pem.write_to_path(str(paths["ca"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return paths


async def test_pipeline_over_tls(settings: Settings, tmp_path: Path) -> None:
    certificates = write_certificates(tmp_path)
    assert settings.database_url is not None
    connection = await connect(settings.database_url)
    try:
        _, key = await auth.create_key(connection, "harbor")
    finally:
        await connection.close()
    secured = settings.model_copy(
        update={
            "allow_unauthenticated": False,
            "tls_cert_file": certificates["cert"],
            "tls_key_file": certificates["key"],
            "tls_ca_file": certificates["ca"],
        }
    )
    credentials = grpc.ssl_channel_credentials(certificates["ca"].read_bytes())
    metadata = (("authorization", f"Bearer {key}"),)
    async with running_pipeline(secured, credentials) as pipeline:
        uploads = upload_grpc.UploadServiceStub(pipeline.gateway_channel)
        response = await uploads.Upload(
            upload_messages(TEXT, "harbor.md"), metadata=metadata
        )
        last = None
        async with asyncio.timeout(180):
            async for update in uploads.WatchJob(
                upload_pb.WatchJobRequest(job_id=response.job.job_id),
                metadata=metadata,
            ):
                last = update.job
        assert last is not None
        assert last.status == resources_pb2.JOB_STATUS_COMPLETE, last.last_error

        # Search makes the gateway call the embedder over TLS with the key.
        search = search_service_pb2_grpc.SearchServiceStub(pipeline.gateway_channel)
        found = await search.Search(
            search_service_pb2.SearchRequest(query="ships entering at night"),
            metadata=metadata,
        )
        assert [result.filename for result in found.results] == ["harbor.md"]

        target = pipeline.gateway_target
        async with grpc.aio.insecure_channel(target) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await upload_grpc.UploadServiceStub(plain).ListJobs(
                    upload_pb.ListJobsRequest(), metadata=metadata, timeout=5
                )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

        # A client that trusts another CA does not accept the server.
        stranger = grpc.ssl_channel_credentials(trustme.CA().cert_pem.bytes())
        async with grpc.aio.secure_channel(target, stranger) as untrusted:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await upload_grpc.UploadServiceStub(untrusted).ListJobs(
                    upload_pb.ListJobsRequest(), metadata=metadata, timeout=5
                )
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

        # The CLI connects with TLS when INGESTD_TLS_CA_FILE is set.
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env.update(
            {
                "INGESTD_GATEWAY_ADDRESS": target,
                "INGESTD_API_KEY": key,
                "INGESTD_TLS_CA_FILE": str(certificates["ca"]),
                "INGESTD_DATA_DIR": str(tmp_path / "cli"),
            }
        )
        completed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "ingestd.cli", "search", "harbor master"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert completed.returncode == 0, completed.stderr
    assert "harbor.md" in completed.stdout
