"""Settings for every ingestd process, read from ``INGESTD_*`` variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import platformdirs
from limits import parse_many
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Typed settings. Each field is read from ``INGESTD_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix="INGESTD_", extra="ignore")

    # Database. Unset means the embedded PostgreSQL under data_dir.
    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL; unset starts an embedded server in data_dir",
    )
    data_dir: Path = Field(
        default_factory=lambda: platformdirs.user_data_path("ingestd"),
        description="folder for the embedded database and the default blob store",
    )
    storage_dir: Path | None = Field(
        default=None, description="blob store folder; unset means data_dir/blobs"
    )
    db_pool_min_size: int = Field(default=1, ge=0, le=100)
    db_pool_max_size: int = Field(default=8, ge=1, le=500)

    # Network. Every service binds host; the gateway reaches the embedder
    # at embedder_address.
    host: str = "127.0.0.1"
    gateway_port: int = Field(default=50051, ge=0, le=65535)
    chunker_port: int = Field(default=50052, ge=0, le=65535)
    embedder_port: int = Field(default=50053, ge=0, le=65535)
    embedder_address: str | None = Field(
        default=None,
        description="host:port of the embedder; unset means host:embedder_port",
    )
    chunker_address: str | None = Field(
        default=None,
        description="host:port of the chunker; unset means host:chunker_port",
    )
    grpc_max_message_bytes: int = Field(default=8 * MiB, ge=MiB)
    grpc_max_concurrent_rpcs: int = Field(default=256, ge=1)
    default_user: str = Field(
        default="local",
        min_length=1,
        description="user id of calls without a key when allow_unauthenticated is on, "
        "and of the key `ingestd up` creates",
    )

    # Authentication and transport security.
    allow_unauthenticated: bool = Field(
        default=False,
        description="development only: calls without an API key act as default_user "
        "with admin rights, and services start with no keys in the database",
    )
    auth_cache_seconds: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="how long a service caches a key's row; a revoked key works at most this long",
    )
    rate_limit: str = Field(
        default="50/second;1000/minute",
        description="requests allowed per API key and service process, in the "
        "'N/second;M/minute' syntax of the limits package",
    )
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate chain the services present"
    )
    tls_key_file: Path | None = Field(
        default=None, description="PEM private key of tls_cert_file"
    )
    tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that clients and the gateway trust; unset means the system's",
    )

    # Worker and claim protocol.
    worker_enabled: bool = True
    lease_seconds: float = Field(default=60.0, gt=0.5, le=3600)
    poll_interval_seconds: float = Field(default=5.0, gt=0, le=300)
    claim_batch_size: int = Field(default=4, ge=1, le=100)
    max_concurrent_jobs: int = Field(default=2, ge=1, le=64)
    max_attempts: int = Field(default=5, ge=1, le=100)
    max_retries: int = Field(default=3, ge=0, le=20)
    backoff_base_seconds: float = Field(default=3.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=600)
    # Hand-offs of jobs whose last step writes only the job row are
    # committed in batches (BaseWorker.hand_off): a batch is flushed at this
    # many jobs, when every job the worker holds waits for it, or when its
    # oldest hand-off has waited the delay.
    # At most jobs.MAX_NOTIFY_JOB_IDS, the ids one notification carries.
    hand_off_batch_size: int = Field(default=100, ge=1, le=100)
    hand_off_max_delay_seconds: float = Field(default=0.005, ge=0, le=1)

    # Upload and parse.
    max_upload_bytes: int = Field(default=100 * MiB, ge=1)
    upload_chunk_bytes: int = Field(default=64 * 1024, ge=1024)
    upload_idle_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="an upload that sends nothing for this long is ended",
    )
    # Uploads and watches are long-lived streams. Capping them below
    # grpc_max_concurrent_rpcs keeps slots free for short calls such as
    # GetJob and Search.
    max_concurrent_uploads: int = Field(default=32, ge=1)
    max_concurrent_uploads_per_user: int = Field(
        default=4,
        ge=1,
        description="open upload streams one user may have on one gateway",
    )
    max_concurrent_watches: int = Field(default=128, ge=1)
    max_concurrent_watches_per_user: int = Field(
        default=16,
        ge=1,
        description="open WatchJob streams one user may have on one gateway",
    )
    parse_timeout_seconds: float = Field(
        default=300.0, gt=0, description="CPU seconds the parse child may use"
    )
    parse_wall_timeout_seconds: float = Field(
        default=310.0,
        gt=0,
        description="seconds the parse child may run before it is killed, "
        "whether it computes or waits",
    )
    parse_memory_limit_bytes: int = Field(default=2048 * MiB, ge=64 * MiB)
    max_pages: int = Field(
        default=2000, ge=1, description="maximum number of pages of a PDF"
    )
    max_parsed_chars: int = Field(
        default=5_000_000,
        ge=1,
        description="maximum number of characters of one parsed document",
    )
    max_chunks_per_document: int = Field(
        default=10_000,
        ge=1,
        description="maximum number of chunks one document may yield",
    )

    # Chunking, in the embedding model's tokens with special tokens counted.
    chunk_min_tokens: int = Field(default=200, ge=1)
    chunk_max_tokens: int = Field(default=256, ge=8)
    chunk_overlap_tokens: int = Field(default=32, ge=0)
    chunk_max_chars: int = Field(
        default=4096,
        ge=256,
        description="longest chunk in characters, for text the tokenizer reads as few tokens",
    )

    # Embedding.
    embed_backend: Literal["sentence-transformers", "onnx", "openai"] = Field(
        default="sentence-transformers",
        description="sentence-transformers runs the local model with torch; onnx "
        "runs the same model with ONNX Runtime, exported at first use into "
        "data_dir/models; openai calls an OpenAI-compatible /embeddings endpoint "
        "at embed_api_url",
    )
    embed_model_path: Path | None = Field(
        default=None,
        description="sentence-transformers model folder; unset means the packaged all-MiniLM-L6-v2",
    )
    embed_batch_size: int = Field(default=64, ge=1, le=256)
    embed_api_url: str | None = Field(
        default=None,
        description="base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1",
    )
    embed_api_key: SecretStr | None = Field(
        default=None, description="bearer token for the embedding API"
    )
    embed_api_model: str | None = Field(
        default=None, description="model name sent to the embedding API"
    )
    embed_api_dimensions: int = Field(
        default=384,
        ge=1,
        description="vector size the API returns; the database column holds 384",
    )
    embed_api_send_dimensions: bool = Field(
        default=True,
        description="send embed_api_dimensions as the request's dimensions field",
    )
    embed_api_revision: str = Field(
        default="1",
        min_length=1,
        max_length=32,
        description="label to change when the remote model changes; part of embed_version",
    )
    embed_api_timeout_seconds: float = Field(default=30.0, gt=0)
    embed_threads: int = Field(
        default=0,
        ge=0,
        description="torch or ONNX Runtime threads; 0 keeps the library's default",
    )

    # Buffer retention: buffer rows of complete jobs are archived and deleted
    # after this long.
    buffer_retention_seconds: float = Field(default=7 * 24 * 3600.0, ge=0)
    archive_interval_seconds: float = Field(default=600.0, gt=0)

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _check_relations(self) -> Settings:
        if self.chunk_min_tokens > self.chunk_max_tokens:
            raise ValueError(
                f"INGESTD_CHUNK_MIN_TOKENS ({self.chunk_min_tokens}) must not exceed "
                f"INGESTD_CHUNK_MAX_TOKENS ({self.chunk_max_tokens})"
            )
        if self.chunk_overlap_tokens >= self.chunk_min_tokens:
            raise ValueError(
                f"INGESTD_CHUNK_OVERLAP_TOKENS ({self.chunk_overlap_tokens}) must be "
                f"smaller than INGESTD_CHUNK_MIN_TOKENS ({self.chunk_min_tokens})"
            )
        if self.max_concurrent_uploads_per_user > self.max_concurrent_uploads:
            raise ValueError(
                f"INGESTD_MAX_CONCURRENT_UPLOADS_PER_USER ({self.max_concurrent_uploads_per_user}) "
                f"must not exceed INGESTD_MAX_CONCURRENT_UPLOADS ({self.max_concurrent_uploads})"
            )
        if self.max_concurrent_watches_per_user > self.max_concurrent_watches:
            raise ValueError(
                f"INGESTD_MAX_CONCURRENT_WATCHES_PER_USER ({self.max_concurrent_watches_per_user}) "
                f"must not exceed INGESTD_MAX_CONCURRENT_WATCHES ({self.max_concurrent_watches})"
            )
        streams = self.max_concurrent_uploads + self.max_concurrent_watches
        if streams >= self.grpc_max_concurrent_rpcs:
            raise ValueError(
                f"INGESTD_MAX_CONCURRENT_UPLOADS plus INGESTD_MAX_CONCURRENT_WATCHES ({streams}) "
                f"must stay below INGESTD_GRPC_MAX_CONCURRENT_RPCS ({self.grpc_max_concurrent_rpcs}), "
                "so short calls always find a free slot"
            )
        if self.embed_backend == "openai" and not (
            self.embed_api_url and self.embed_api_model
        ):
            raise ValueError(
                "INGESTD_EMBED_BACKEND=openai needs INGESTD_EMBED_API_URL and "
                "INGESTD_EMBED_API_MODEL"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "set both INGESTD_TLS_CERT_FILE and INGESTD_TLS_KEY_FILE, or neither"
            )
        try:
            parse_many(self.rate_limit)
        except ValueError as exc:
            raise ValueError(
                f"INGESTD_RATE_LIMIT {self.rate_limit!r} is invalid ({exc}); "
                "write limits such as '50/second;1000/minute'"
            ) from None
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ValueError(
                "INGESTD_DB_POOL_MIN_SIZE must not exceed INGESTD_DB_POOL_MAX_SIZE"
            )
        return self

    @property
    def blob_dir(self) -> Path:
        """Folder of the local blob store."""
        return self.storage_dir or self.data_dir / "blobs"

    @property
    def model_cache_dir(self) -> Path:
        """Folder of models converted at first use, such as ONNX exports."""
        return self.data_dir / "models"

    @property
    def pgdata_dir(self) -> Path:
        """Data folder of the embedded PostgreSQL."""
        return self.data_dir / "pgdata"

    @property
    def embedder_target(self) -> str:
        """Address the gateway dials to reach the embedder."""
        return self.embedder_address or f"{self.host}:{self.embedder_port}"

    @property
    def chunker_target(self) -> str:
        """Address the gateway dials to reach the chunker."""
        return self.chunker_address or f"{self.host}:{self.chunker_port}"

    @property
    def tls_enabled(self) -> bool:
        """True when the services serve TLS and call each other over it."""
        return self.tls_cert_file is not None

    def heartbeat_interval_seconds(self) -> float:
        """Seconds between lease renewals: a quarter of the lease."""
        return self.lease_seconds / 4


class SettingsError(ValueError):
    """Settings in the environment that do not validate.

    The message names each variable and what is wrong with it, and never
    shows a value: pydantic's own message prints the input, which may
    hold the database password or the embedding API key.
    """


def describe_settings_error(exc: ValidationError) -> str:
    """Describe each problem on one line that names its INGESTD_ variable, without values."""
    lines = []
    for error in exc.errors(
        include_input=False, include_url=False, include_context=False
    ):
        message = error["msg"].removeprefix("Value error, ")
        if error["loc"]:
            variable = "INGESTD_" + "_".join(str(part) for part in error["loc"]).upper()
            lines.append(f"{variable}: {message}")
        else:
            lines.append(message)
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings() -> Settings:
    """Read the settings from the environment; raise SettingsError when invalid."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_settings_error(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings, read once from the environment."""
    return load_settings()
