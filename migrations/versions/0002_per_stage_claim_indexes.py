"""Replace the claim index with one partial index per stage.

The old index on (status, run_after, created_at) is ordered by status
first. A claim takes several statuses at once and orders by
(run_after, created_at), so PostgreSQL 18 read every waiting job of those
statuses through a bitmap scan and sorted them before it applied the LIMIT.
An index on (run_after, created_at) whose predicate lists one stage's
claimable statuses returns rows already in claim order. The claim then
stops reading once it has a batch, however long the queue is.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The claimable statuses of each stage, as the keys of StageSpec.claims in
# shared/jobs.py list them when this migration was written. A stage that
# claims a status missing here needs a new migration, because PostgreSQL
# uses a partial index only when the query's status list implies its
# predicate.
STAGE_STATUSES = {
    "parse": ("uploaded", "parse_queued", "parsed"),
    "chunk": ("parse_validated", "chunking"),
    "embed": (
        "chunks_stored",
        "embedding_queued",
        "embedding_in_progress",
        "embeddings_stored",
    ),
}
TERMINAL = ("complete", "failed_parse", "failed_chunking", "failed_embedding")


def _quoted(values: Sequence[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


def upgrade() -> None:
    # NOTE: env.py runs each migration in a transaction, so these are plain
    # CREATE INDEX statements, not CONCURRENTLY. Each one blocks writes to
    # upload_jobs while it builds.
    for stage, statuses in STAGE_STATUSES.items():
        op.create_index(
            f"upload_jobs_{stage}_claim_idx",
            "upload_jobs",
            ["run_after", "created_at"],
            postgresql_where=sa.text(f"status IN ({_quoted(statuses)})"),
        )
    op.drop_index("upload_jobs_claim_idx", table_name="upload_jobs")


def downgrade() -> None:
    op.create_index(
        "upload_jobs_claim_idx",
        "upload_jobs",
        ["status", "run_after", "created_at"],
        postgresql_where=sa.text(f"status NOT IN ({_quoted(TERMINAL)})"),
    )
    for stage in reversed(STAGE_STATUSES):
        op.drop_index(f"upload_jobs_{stage}_claim_idx", table_name="upload_jobs")
