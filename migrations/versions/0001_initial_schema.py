"""Create documents, jobs, buffers, searchable chunks and job events.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from pgvector.sqlalchemy import Vector
from sqlalchemy.dialects import postgresql as pg

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = (
    "uploaded",
    "parse_queued",
    "parsed",
    "parse_validated",
    "chunking",
    "chunks_stored",
    "embedding_queued",
    "embedding_in_progress",
    "embeddings_stored",
    "complete",
    "failed_parse",
    "failed_chunking",
    "failed_embedding",
)
TERMINAL = ("complete", "failed_parse", "failed_chunking", "failed_embedding")

# Dimensions of the searchable vectors. The HNSW index needs a fixed
# dimension, so a model of another size needs a migration of its own.
EMBEDDING_DIMENSIONS = 384


def _now() -> sa.TextClause:
    return sa.text("now()")


def _quoted(values: Sequence[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")

    op.create_table(
        "documents",
        sa.Column("document_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("filename", sa.Text, nullable=False, server_default=""),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("declared_content_type", sa.Text, nullable=False, server_default=""),
        sa.Column("byte_size", sa.BigInteger, nullable=False),
        sa.Column("raw_sha256", sa.Text, nullable=False),
        sa.Column("raw_path", sa.Text, nullable=False),
        sa.Column("parsed_path", sa.Text),
        sa.Column("parsed_sha256", sa.Text),
        sa.Column("page_count", sa.Integer),
        # Offset of each PDF page's first character in the parsed text, so
        # the chunker can give every chunk its page range.
        sa.Column("page_offsets", pg.ARRAY(sa.Integer)),
        sa.Column("encoding", sa.Text),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
        sa.UniqueConstraint(
            "user_id", "raw_sha256", name="documents_user_raw_sha256_key"
        ),
    )
    op.create_index(
        "documents_user_created_idx",
        "documents",
        ["user_id", sa.text("created_at DESC"), "document_id"],
    )

    op.create_table(
        "upload_jobs",
        sa.Column("job_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column(
            "document_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("documents.document_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("status", sa.Text, nullable=False, server_default="uploaded"),
        sa.Column("raw_path", sa.Text, nullable=False),
        sa.Column("parsed_path", sa.Text),
        sa.Column("parsed_sha256", sa.Text),
        sa.Column("chunker_name", sa.Text, nullable=False),
        sa.Column("chunker_version", sa.Text, nullable=False),
        sa.Column("embed_model", sa.Text, nullable=False),
        sa.Column("embed_version", sa.Text, nullable=False),
        sa.Column(
            "progress",
            pg.JSONB,
            nullable=False,
            server_default=sa.text(
                """'{"chunks_total": 0, "chunks_done": 0, "embeds_total": 0, "embeds_done": 0}'::jsonb"""
            ),
        ),
        sa.Column("retry_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="5"),
        sa.Column("last_error", pg.JSONB),
        sa.Column(
            "run_after",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
        sa.Column("lease_token", pg.UUID(as_uuid=True)),
        sa.Column("leased_by", sa.Text),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        # Encrypted PDFs may carry a password in the upload; it is kept until
        # the parse succeeds and then cleared.
        sa.Column("parse_password", sa.Text),
        sa.Column("buffers_archived_at", sa.DateTime(timezone=True)),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
        sa.CheckConstraint(
            f"status IN ({_quoted(STATUSES)})", name="upload_jobs_status_check"
        ),
        sa.CheckConstraint(
            "attempts >= 0 AND retry_count >= 0", name="upload_jobs_counts_check"
        ),
        sa.UniqueConstraint(
            "document_id",
            "chunker_name",
            "chunker_version",
            "embed_model",
            "embed_version",
            name="upload_jobs_identity_key",
        ),
    )
    # The claim query's index: only rows that can still be claimed are in
    # it, so it stays small however many finished jobs pile up.
    op.create_index(
        "upload_jobs_claim_idx",
        "upload_jobs",
        ["status", "run_after", "created_at"],
        postgresql_where=sa.text(f"status NOT IN ({_quoted(TERMINAL)})"),
    )
    op.create_index(
        "upload_jobs_user_created_idx",
        "upload_jobs",
        ["user_id", sa.text("created_at DESC"), "job_id"],
    )
    op.create_index("upload_jobs_document_idx", "upload_jobs", ["document_id"])
    op.create_index(
        "upload_jobs_archive_idx",
        "upload_jobs",
        ["updated_at"],
        postgresql_where=sa.text("status = 'complete' AND buffers_archived_at IS NULL"),
    )
    # Jobs rows are updated many times each, so vacuum them early and leave
    # room on each page for HOT updates.
    op.execute(
        "ALTER TABLE upload_jobs SET (fillfactor = 80, "
        "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 200, "
        "autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0)"
    )

    op.create_table(
        "document_chunk_buffer",
        sa.Column("chunk_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "document_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("documents.document_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("chunk_ord", sa.Integer, nullable=False),
        sa.Column("chunker_name", sa.Text, nullable=False),
        sa.Column("chunker_version", sa.Text, nullable=False),
        sa.Column("chunk_sha", sa.Text, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column(
            "meta", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
        sa.UniqueConstraint(
            "document_id",
            "chunker_name",
            "chunker_version",
            "chunk_ord",
            name="document_chunk_buffer_position_key",
        ),
    )

    op.create_table(
        "document_vector_buffer",
        sa.Column(
            "document_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("documents.document_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "chunk_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("document_chunk_buffer.chunk_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("embed_model", sa.Text, nullable=False),
        sa.Column("embed_version", sa.Text, nullable=False),
        sa.Column("vector", Vector(), nullable=False),
        sa.Column("vector_sha", sa.Text, nullable=False),
        sa.Column("batch_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
        sa.PrimaryKeyConstraint("chunk_id", "embed_model", "embed_version"),
    )
    op.create_index(
        "document_vector_buffer_document_idx", "document_vector_buffer", ["document_id"]
    )

    op.create_table(
        "document_chunks",
        sa.Column("chunk_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("embed_model", sa.Text, nullable=False),
        sa.Column("embed_version", sa.Text, nullable=False),
        sa.Column(
            "job_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("upload_jobs.job_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "document_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("documents.document_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("chunk_ord", sa.Integer, nullable=False),
        sa.Column("chunker_name", sa.Text, nullable=False),
        sa.Column("chunker_version", sa.Text, nullable=False),
        sa.Column("chunk_sha", sa.Text, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column(
            "meta", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column("embedding", Vector(EMBEDDING_DIMENSIONS), nullable=False),
        sa.Column("vector_sha", sa.Text, nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
        sa.PrimaryKeyConstraint("chunk_id", "embed_model", "embed_version"),
    )
    op.create_index(
        "document_chunks_user_idx", "document_chunks", ["user_id", "embed_model"]
    )
    op.create_index("document_chunks_document_idx", "document_chunks", ["document_id"])
    op.execute(
        "CREATE INDEX document_chunks_embedding_hnsw_idx ON document_chunks "
        "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )

    op.create_table(
        "job_events",
        sa.Column("event_id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "job_id",
            pg.UUID(as_uuid=True),
            sa.ForeignKey("upload_jobs.job_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("from_status", sa.Text),
        sa.Column("to_status", sa.Text, nullable=False),
        sa.Column("worker", sa.Text),
        sa.Column("lease_token", pg.UUID(as_uuid=True)),
        sa.Column(
            "detail", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=_now(),
        ),
    )
    op.create_index("job_events_job_idx", "job_events", ["job_id", "event_id"])


def downgrade() -> None:
    op.drop_table("job_events")
    op.drop_table("document_chunks")
    op.drop_table("document_vector_buffer")
    op.drop_table("document_chunk_buffer")
    op.drop_table("upload_jobs")
    op.drop_table("documents")
