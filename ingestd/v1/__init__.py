"""Generated ingestd.v1 API."""
