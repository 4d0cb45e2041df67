"""Alembic migrations: the only source of ingestd's DDL.

``upgrade`` and ``downgrade`` run them programmatically, so an installed
distribution migrates without an alembic.ini.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config(database_url: str) -> Config:
    """Build an alembic Config for the given PostgreSQL URL."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    # The URL goes through attributes, not the ini options, because
    # ConfigParser would treat '%' in passwords as interpolation.
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Apply migrations up to revision."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    """Revert migrations down to revision (``base`` removes everything)."""
    command.downgrade(alembic_config(database_url), revision)
