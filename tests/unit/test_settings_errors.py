"""Invalid settings fail with a message that names each variable and no secret."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.config import SettingsError, load_settings
from tests.conftest import REPO_ROOT

SECRET_KEY = "sk-do-not-print-this"
SECRET_PASSWORD = "hunter2-do-not-print"
SECRETS = {
    "INGESTD_EMBED_API_KEY": SECRET_KEY,
    "INGESTD_DATABASE_URL": f"postgresql://ingest:{SECRET_PASSWORD}@127.0.0.1/db",
}


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("INGESTD_"):
            monkeypatch.delenv(name)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"INGESTD_GATEWAY_PORT": "abc"}, "INGESTD_GATEWAY_PORT: Input should be"),
        ({"INGESTD_RATE_LIMIT": "bogus"}, "INGESTD_RATE_LIMIT 'bogus' is invalid"),
        ({"INGESTD_TLS_CERT_FILE": "/x"}, "set both INGESTD_TLS_CERT_FILE"),
        ({"INGESTD_LOG_FORMAT": "xml"}, "INGESTD_LOG_FORMAT: Input should be"),
    ],
)
def test_invalid_settings_name_the_variable_and_hide_secrets(
    clean_environment: pytest.MonkeyPatch, variables: dict[str, str], expected: str
) -> None:
    for name, value in variables.items():
        clean_environment.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert expected in message
    assert SECRET_KEY not in message
    assert SECRET_PASSWORD not in message
    assert "pydantic" not in message


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "services.embedder"],
        [sys.executable, "-m", "ingestd.cli", "jobs"],
        [sys.executable, "-m", "shared.healthcheck", "50053"],
    ],
)
def test_processes_exit_cleanly_on_invalid_settings(command: list[str]) -> None:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("INGESTD_")
    }
    environment.update(SECRETS, INGESTD_RATE_LIMIT="bogus")
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode in (1, 2), output
    assert "INGESTD_RATE_LIMIT 'bogus' is invalid" in output
    assert "Traceback" not in output
    assert SECRET_KEY not in output
    assert SECRET_PASSWORD not in output
