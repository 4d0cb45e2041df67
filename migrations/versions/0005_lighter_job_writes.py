"""Make each job transition write less: one index fewer, no foreign key check.

Every claim and hand-off updates a job row and appends a job_events row.
The update changes the status, which is part of index predicates, so it is
never a HOT update and adds an entry to every index of upload_jobs. The
index on document_id alone duplicates the first column of
upload_jobs_identity_key, which serves the same lookups, so it goes.

The foreign key from job_events to upload_jobs checked each new event with
a row lookup and a row lock on the job. Every event is written by the
statement or transaction that inserts or updates its job row, while it holds
that row's lock, so the check could not fail. A statement trigger now does
the foreign key's other task: deleting a job, directly or through the
cascade from its document, deletes its events.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("upload_jobs_document_idx", table_name="upload_jobs")
    op.drop_constraint("job_events_job_id_fkey", "job_events", type_="foreignkey")
    op.execute(
        """
        CREATE FUNCTION ingestd_delete_job_events() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM job_events AS e
            USING deleted_jobs AS d
            WHERE e.job_id = d.job_id;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER upload_jobs_delete_events
        AFTER DELETE ON upload_jobs
        REFERENCING OLD TABLE AS deleted_jobs
        FOR EACH STATEMENT EXECUTE FUNCTION ingestd_delete_job_events()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER upload_jobs_delete_events ON upload_jobs")
    op.execute("DROP FUNCTION ingestd_delete_job_events()")
    op.create_foreign_key(
        "job_events_job_id_fkey",
        "job_events",
        "upload_jobs",
        ["job_id"],
        ["job_id"],
        ondelete="CASCADE",
    )
    op.create_index("upload_jobs_document_idx", "upload_jobs", ["document_id"])
