"""Index searchable vectors by chunk_sha, model and version.

The embed worker looks up a stored vector for each chunk whose text
(chunk_sha) was already embedded with the same model and version, and
copies it instead of running the model again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "document_chunks_chunk_sha_idx",
        "document_chunks",
        ["chunk_sha", "embed_model", "embed_version"],
    )


def downgrade() -> None:
    op.drop_index("document_chunks_chunk_sha_idx", table_name="document_chunks")
