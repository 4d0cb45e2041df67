"""Run the CLI with ``python -m ingestd.cli``."""

from ingestd.cli.main import main

main()
