"""Add API keys: one row per key, storing only a hash of its secret.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        # The public part of the key, shown in listings and logs.
        sa.Column("key_id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
        # SHA-256 of the secret part, hex. The secret itself is never stored.
        sa.Column("secret_sha256", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False, server_default=""),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("key_id ~ '^[0-9a-f]{12}$'", name="api_keys_key_id_format"),
        sa.CheckConstraint(
            "secret_sha256 ~ '^[0-9a-f]{64}$'", name="api_keys_secret_sha256_format"
        ),
    )
    op.create_index("api_keys_user_idx", "api_keys", ["user_id"])


def downgrade() -> None:
    op.drop_index("api_keys_user_idx", table_name="api_keys")
    op.drop_table("api_keys")
