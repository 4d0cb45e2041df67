"""Tests for docker-compose.yml against the settings, and for shared.healthcheck.

The tests parse the compose file and need no Docker engine. The health check
module runs as a real subprocess against an in-process gRPC server.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shared.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

# Each application service and the Settings field of its port.
APP_SERVICES = {
    "gateway": "gateway_port",
    "chunker": "chunker_port",
    "embedder": "embedder_port",
}
ALL_SERVICES = {"postgres", "migrate", *APP_SERVICES}
SETTINGS_VARIABLE = re.compile(r"\bINGESTD_[A-Z0-9_]+\b")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)")
DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
SUBPROCESS_TIMEOUT_SECONDS = 20.0


def default_of(field: str) -> Any:
    """Return the declared default of a Settings field, whatever the environment."""
    return Settings.model_fields[field].default


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return compose["services"][name]


def environment(definition: dict[str, Any]) -> dict[str, str]:
    """Return a service's environment, given as a mapping or as KEY=VALUE items."""
    variables = definition.get("environment") or {}
    if isinstance(variables, list):
        variables = dict(item.split("=", 1) for item in variables)
    return {key: str(value) for key, value in variables.items()}


def dependencies(definition: dict[str, Any]) -> dict[str, str]:
    """Map each service in depends_on to the condition it waits for."""
    depends_on = definition.get("depends_on") or {}
    if isinstance(depends_on, list):
        return dict.fromkeys(depends_on, "service_started")
    return {name: entry["condition"] for name, entry in depends_on.items()}


def command(definition: dict[str, Any]) -> list[str]:
    value = definition["command"]
    return shlex.split(value) if isinstance(value, str) else list(value)


def published_ports(definition: dict[str, Any]) -> dict[int, int]:
    """Map each published container port to its host port."""
    ports: dict[int, int] = {}
    for entry in definition.get("ports") or []:
        if isinstance(entry, dict):
            ports[int(entry["target"])] = int(entry["published"])
            continue
        # Short syntax: [HOST_IP:]HOST_PORT:CONTAINER_PORT[/PROTOCOL].
        parts = str(entry).split("/", 1)[0].rsplit(":", 2)
        ports[int(parts[-1])] = int(parts[-2])
    return ports


def volume_mounts(definition: dict[str, Any]) -> dict[str, str]:
    """Map each mount target to its source volume or host path."""
    mounts: dict[str, str] = {}
    for entry in definition.get("volumes") or []:
        if isinstance(entry, dict):
            mounts[entry["target"]] = entry["source"]
            continue
        source, target = str(entry).split(":")[:2]
        mounts[target] = source
    return mounts


def duration_seconds(value: str | int | float) -> float:
    """Convert a compose duration such as "1m30s" to seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = DURATION_PART.findall(value)
    assert "".join(number + unit for number, unit in parts) == value, (
        f"invalid compose duration {value!r}"
    )
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)


def service_settings(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Build Settings from a service's environment alone, as its process would."""
    for variable in list(os.environ):
        if variable.startswith("INGESTD_"):
            monkeypatch.delenv(variable)
    for variable, value in environment(service(compose, name)).items():
        monkeypatch.setenv(variable, value)
    return Settings()


def unknown_settings_variables(text: str) -> list[str]:
    """List the INGESTD_* names in text that match no Settings field."""
    names = sorted(set(SETTINGS_VARIABLE.findall(text)))
    return [
        name
        for name in names
        if name.removeprefix("INGESTD_").lower() not in Settings.model_fields
    ]


# Services and dependencies ------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_SERVICES))
def test_compose_defines_service(compose: dict[str, Any], name: str) -> None:
    assert name in compose["services"]


def test_postgres_image_has_pgvector(compose: dict[str, Any]) -> None:
    assert service(compose, "postgres")["image"] == "pgvector/pgvector:pg17"


def test_postgres_healthcheck_uses_pg_isready(compose: dict[str, Any]) -> None:
    test = service(compose, "postgres")["healthcheck"]["test"]
    assert "pg_isready" in " ".join(test)


def test_postgres_stores_data_in_named_volume(compose: dict[str, Any]) -> None:
    mounts = volume_mounts(service(compose, "postgres"))
    assert mounts.get("/var/lib/postgresql/data") in compose["volumes"]


def test_migrate_runs_ingestd_migrate(compose: dict[str, Any]) -> None:
    assert command(service(compose, "migrate"))[:2] == ["ingestd", "migrate"]


def test_migrate_saves_first_key_in_volume(compose: dict[str, Any]) -> None:
    migrate = service(compose, "migrate")
    arguments = command(migrate)
    key_file = arguments[arguments.index("--admin-key-file") + 1]
    mounts = volume_mounts(migrate)
    folder = str(Path(key_file).parent)
    assert mounts.get(folder) in compose["volumes"]


def test_migrate_is_one_shot(compose: dict[str, Any]) -> None:
    assert service(compose, "migrate")["restart"] == "no"


def test_migrate_waits_for_healthy_postgres(compose: dict[str, Any]) -> None:
    conditions = dependencies(service(compose, "migrate"))
    assert conditions.get("postgres") == "service_healthy"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_waits_for_migrate(compose: dict[str, Any], name: str) -> None:
    conditions = dependencies(service(compose, name))
    assert conditions.get("migrate") == "service_completed_successfully"


@pytest.mark.parametrize("stage", ["chunker", "embedder"])
def test_gateway_waits_for_healthy_stage(compose: dict[str, Any], stage: str) -> None:
    conditions = dependencies(service(compose, "gateway"))
    assert conditions.get(stage) == "service_healthy"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_runs_own_module(compose: dict[str, Any], name: str) -> None:
    assert command(service(compose, name)) == ["python", "-m", f"services.{name}"]


# Settings -----------------------------------------------------------------


def test_compose_variables_are_settings_fields() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert unknown_settings_variables(text) == []


def test_dockerfile_variables_are_settings_fields() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert unknown_settings_variables(text) == []


def test_dockerfile_runs_as_non_root() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "the Dockerfile sets no USER, so the services run as root"
    assert users[-1] not in {"root", "0"}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_image_creates_storage_dir(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new named volume takes the owner of the image folder it is mounted
    # on, so the image must create that folder for its unprivileged user.
    storage_dir = service_settings(compose, name, monkeypatch).storage_dir
    assert f"mkdir -p {storage_dir}" in DOCKERFILE.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_port_is_default(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    field = APP_SERVICES[name]
    settings = service_settings(compose, name, monkeypatch)
    assert getattr(settings, field) == default_of(field)


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_publishes_default_port(compose: dict[str, Any], name: str) -> None:
    port = default_of(APP_SERVICES[name])
    assert published_ports(service(compose, name)).get(port) == port


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_listens_on_all_interfaces(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert service_settings(compose, name, monkeypatch).host == "0.0.0.0"


@pytest.mark.parametrize("name", [*APP_SERVICES, "migrate"])
def test_database_url_points_at_postgres(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = urlsplit(service_settings(compose, name, monkeypatch).database_url or "")
    postgres = environment(service(compose, "postgres"))
    assert url.hostname == "postgres"
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path == f"/{postgres['POSTGRES_DB']}"


@pytest.mark.parametrize("stage", ["chunker", "embedder"])
def test_gateway_dials_stage_service(
    compose: dict[str, Any], stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = service_settings(compose, "gateway", monkeypatch)
    target = getattr(settings, f"{stage}_target")
    assert target == f"{stage}:{default_of(APP_SERVICES[stage])}"


# Health checks, storage and shutdown -------------------------------------


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_healthcheck_calls_health_module(
    compose: dict[str, Any], name: str
) -> None:
    test = service(compose, name)["healthcheck"]["test"]
    port = str(default_of(APP_SERVICES[name]))
    assert test == ["CMD", "python", "-m", "shared.healthcheck", port]


def test_embedder_healthcheck_allows_model_load(compose: dict[str, Any]) -> None:
    healthcheck = service(compose, "embedder")["healthcheck"]
    assert duration_seconds(healthcheck["start_period"]) >= 60


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_mounts_storage_dir(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage_dir = service_settings(compose, name, monkeypatch).storage_dir
    mounts = volume_mounts(service(compose, name))
    assert storage_dir is not None
    assert mounts.get(str(storage_dir)) in compose["volumes"]


def test_app_services_share_storage(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = set()
    for name in APP_SERVICES:
        storage_dir = str(service_settings(compose, name, monkeypatch).storage_dir)
        volume = volume_mounts(service(compose, name)).get(storage_dir)
        storage.add((storage_dir, volume))
    assert len(storage) == 1


@pytest.mark.parametrize("name", APP_SERVICES)
def test_stop_grace_exceeds_shutdown_grace(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grace = service_settings(compose, name, monkeypatch).shutdown_grace_seconds
    stop_grace = duration_seconds(service(compose, name)["stop_grace_period"])
    assert stop_grace > grace


# shared.healthcheck ---------------------------------------------------------


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[health.aio.HealthServicer, int]]:
    """A gRPC server on a free loopback port with only the health service."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(None)


async def run_healthcheck(port: int) -> tuple[int, str]:
    """Run the health check module against port and return exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.healthcheck",
        str(port),
        "--timeout",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(
        process.communicate(), timeout=SUBPROCESS_TIMEOUT_SECONDS
    )
    assert process.returncode is not None
    return process.returncode, stderr.decode("utf-8", "replace")


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_healthcheck_serving_exits_zero(
    health_server: tuple[health.aio.HealthServicer, int],
) -> None:
    servicer, port = health_server
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    returncode, stderr = await run_healthcheck(port)
    assert returncode == 0, stderr


async def test_healthcheck_not_serving_exits_one(
    health_server: tuple[health.aio.HealthServicer, int],
) -> None:
    servicer, port = health_server
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    returncode, stderr = await run_healthcheck(port)
    assert returncode == 1
    assert "NOT_SERVING" in stderr


async def test_healthcheck_shutdown_exits_one(
    health_server: tuple[health.aio.HealthServicer, int],
) -> None:
    servicer, port = health_server
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    # The services call this on SIGTERM, so a draining container turns unhealthy.
    await servicer.enter_graceful_shutdown()
    returncode, _ = await run_healthcheck(port)
    assert returncode == 1


async def test_healthcheck_closed_port_exits_one() -> None:
    returncode, stderr = await run_healthcheck(closed_port())
    assert returncode == 1
    assert "UNAVAILABLE" in stderr
