"""The ``ingestd`` command line: a gRPC client of the running services.

Only ``migrate``, ``up`` and ``demo`` touch the database (to migrate it and to
start the embedded server). Every other command talks to the gateway over
gRPC, so it works the same against remote services.
"""

from ingestd.cli.main import main

__all__ = ["main"]
