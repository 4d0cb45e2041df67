"""Deterministic ids: UUIDv5 of documented canonical strings.

Every id lives in one namespace, so the same inputs give the same id on any
machine, and a repeated write of the same thing collides on its primary key
instead of making a copy.
"""

from __future__ import annotations

import re
import uuid

NAMESPACE = uuid.UUID("6c8a1e6e-1f0b-4aa8-9f0a-1a7c2e6f2b42")


# User ids appear in storage keys, so they are limited to characters that are
# safe in a path segment.
USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _uuid5(canonical: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, canonical)


def document_id(user_id: str, raw_sha256: str) -> uuid.UUID:
    """Id of a user's document: ``document:{user_id}:{raw_sha256}``."""
    return _uuid5(f"document:{user_id}:{raw_sha256}")


def job_id(
    document: uuid.UUID,
    chunker_name: str,
    chunker_version: str,
    embed_model: str,
    embed_version: str,
) -> uuid.UUID:
    """Id of a job:
    ``job:{document_id}:{chunker_name}:{chunker_version}:{embed_model}:{embed_version}``.
    """
    return _uuid5(
        f"job:{document}:{chunker_name}:{chunker_version}:{embed_model}:{embed_version}"
    )


def chunk_id(
    document: uuid.UUID, chunker_name: str, chunker_version: str, chunk_ord: int
) -> uuid.UUID:
    """Id of a chunk: ``{document_id}:{chunker_name}:{chunker_version}:{chunk_ord}``,
    lowercased.
    """
    return _uuid5(f"{document}:{chunker_name}:{chunker_version}:{chunk_ord}".lower())


def batch_id(
    job: uuid.UUID, embed_model: str, embed_version: str, first_ord: int, last_ord: int
) -> uuid.UUID:
    """Id of an embedding batch:
    ``batch:{job_id}:{embed_model}:{embed_version}:{first_ord}-{last_ord}``.
    """
    return _uuid5(f"batch:{job}:{embed_model}:{embed_version}:{first_ord}-{last_ord}")


def quoted_value(value: object, limit: int = 64) -> str:
    """Quote a client-supplied value for an error message, cut to limit characters.

    A message that repeated a value of any length could exceed the size of
    the status that gRPC clients accept, and the client would see a
    transport error instead of the message.
    """
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r} (cut to its first {limit} characters)"
    return repr(value)


def parse_uuid(value: str, field: str) -> uuid.UUID:
    """Parse a client-supplied UUID, raising ValueError that names the field."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise ValueError(
            f"{field} {quoted_value(value)} is not a valid UUID; pass the id exactly as "
            "the API returned it, for example 1b4e28ba-2fa1-11d2-883f-0016d3cca427"
        ) from None


def check_user_id(value: str) -> str:
    """Return value if it is a valid user id, else raise ValueError."""
    if not USER_ID_RE.fullmatch(value):
        raise ValueError(
            f"user id {quoted_value(value)} is invalid; use 1 to 64 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return value
