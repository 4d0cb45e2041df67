"""Blob storage for raw uploads, parsed text and buffer archives.

Keys are built here from ids only, never from client-supplied names:
``raw/{user_id}/{document_id}``, ``parsed/{user_id}/{document_id}.md`` and
``archive/{user_id}/{document_id}/{job_id}.jsonl.gz``. The interface is small
enough for an object store such as S3 to implement it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import uuid
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# errno values of a write that found no room: a full file system, a used-up
# quota, or a file size limit (the file system's or RLIMIT_FSIZE).
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_SAFE_SEGMENT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
)


def _check_segment(value: str) -> str:
    if not value or value in {".", ".."} or not set(value) <= _SAFE_SEGMENT:
        raise ValueError(f"invalid storage key segment {value!r}")
    return value


def raw_key(user_id: str, document_id: uuid.UUID) -> str:
    """Key of a document's uploaded bytes."""
    return f"raw/{_user_segment(user_id)}/{document_id}"


def parsed_key(user_id: str, document_id: uuid.UUID) -> str:
    """Key of a document's parsed Markdown."""
    return f"parsed/{_user_segment(user_id)}/{document_id}.md"


def archive_key(user_id: str, document_id: uuid.UUID, job_id: uuid.UUID) -> str:
    """Key of the archived buffer rows of one job."""
    return f"archive/{_user_segment(user_id)}/{document_id}/{job_id}.jsonl.gz"


def is_out_of_space(exc: OSError) -> bool:
    """Return whether a failed write means the store has no room for the bytes."""
    return exc.errno in _NO_SPACE_ERRNOS


def describe_write_error(exc: OSError) -> str:
    """Describe a failed write as a full or an unwritable store, with the OS error."""
    if is_out_of_space(exc):
        return f"the blob storage is full ({exc})"
    return f"the blob storage is not writable ({exc})"


def _user_segment(user_id: str) -> str:
    # User ids are checked when a request arrives (see shared.ids.USER_ID_RE);
    # checking again here keeps a bad id from ever reaching a path.
    return _check_segment(user_id)


class BlobWriter(Protocol):
    """An open upload into the store."""

    def write(self, data: bytes) -> None: ...
    def commit(self, key: str) -> None: ...
    def abort(self) -> None: ...


class BlobStore(Protocol):
    """Blob store operations the services use."""

    def open_writer(self) -> BlobWriter: ...
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...


class LocalBlobWriter:
    """Writes an upload to a temporary file, then renames it into place."""

    def __init__(self, store: LocalBlobStore) -> None:
        self._store = store
        self._tmp_path = store.root / "tmp" / f"{uuid.uuid4()}.part"
        self._tmp_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._tmp_path.open("wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self, key: str) -> None:
        """Make the bytes durable and visible under key, atomically."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._store.path_for(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # rename is atomic on one file system: readers see the old file or
        # the whole new one, and two uploads of equal bytes may both commit.
        os.replace(self._tmp_path, final)

    def abort(self) -> None:
        """Discard the partial upload. Never raises, so the caller's original error propagates."""
        if not self._file.closed:
            # Closing flushes the buffer, which fails again after a failed
            # write, but the file descriptor is closed either way.
            with contextlib.suppress(OSError):
                self._file.close()
        try:
            self._tmp_path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning(
                "cannot delete the temporary file of a failed write; delete it by hand",
                extra={
                    "event": "blob_cleanup_failed",
                    "path": str(self._tmp_path),
                    "error": str(exc),
                },
            )


class LocalBlobStore:
    """Blob store in a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        """Return the file path of key, rejecting keys that leave the root."""
        parts = key.split("/")
        for part in parts:
            _check_segment(part)
        return self.root.joinpath(*parts)

    def open_writer(self) -> LocalBlobWriter:
        return LocalBlobWriter(self)

    def put(self, key: str, data: bytes) -> None:
        writer = self.open_writer()
        try:
            writer.write(data)
            writer.commit(key)
        except BaseException:
            writer.abort()
            raise

    def get(self, key: str) -> bytes:
        return self.path_for(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> bool:
        """Delete key; return whether it existed."""
        try:
            self.path_for(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under a folder prefix; return how many."""
        folder = self.path_for(prefix.rstrip("/"))
        if not folder.is_dir():
            return 0
        count = 0
        for path in sorted(folder.rglob("*"), reverse=True):
            if path.is_file():
                path.unlink()
                count += 1
            else:
                path.rmdir()
        folder.rmdir()
        return count
