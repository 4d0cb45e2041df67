"""ingestd: the generated gRPC API (``ingestd.v1``) and the ``ingestd`` CLI."""
