"""Text normalization and the content hashes stored beside every artifact."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# C0 and C1 control characters other than tab and line feed. PostgreSQL
# rejects NUL in text columns, and the others only add noise to embeddings.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t\f\v]+$", re.MULTILINE)


def normalize_newlines(text: str) -> str:
    """Convert CRLF and lone CR line endings to LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def normalize_text(text: str) -> str:
    """Normalize text for storage and hashing.

    Applies Unicode NFC, converts every line ending to LF, removes control
    characters other than tab and LF, and strips trailing whitespace from
    each line and from the end of the text.
    """
    text = unicodedata.normalize("NFC", normalize_newlines(text))
    text = _CONTROL_CHARS.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    return text.rstrip()


def chunk_sha(text: str) -> str:
    """Return the sha256 hex of a chunk's text after NFC, LF and rstrip."""
    normalized = unicodedata.normalize("NFC", text).replace("\r\n", "\n").rstrip()
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def parsed_sha256(markdown: str) -> str:
    """Return the sha256 hex of parsed Markdown after `normalize_text`."""
    return hashlib.sha256(normalize_text(markdown).encode("utf-8")).hexdigest()


def vector_bytes(vector: Sequence[float] | np.ndarray) -> bytes:
    """Return the canonical bytes of a vector: little-endian float32."""
    # Imported here so the parse child, which needs only the text functions,
    # does not load numpy and OpenBLAS under its memory limit.
    import numpy as np

    return np.asarray(vector, dtype="<f4").tobytes()


def vector_sha(vector: Sequence[float] | np.ndarray) -> str:
    """Return the sha256 hex of a vector's canonical bytes."""
    return hashlib.sha256(vector_bytes(vector)).hexdigest()
