"""Embedding backends behind one interface.

A backend is synchronous and may be slow: the embedder calls it from a
worker thread, never on the event loop. ``embed_model`` and ``embed_version``
name exactly what produced a vector; they are part of every job's identity.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np


class EmbeddingBackend(Protocol):
    """Turns texts into unit-length float32 vectors."""

    name: str
    embed_model: str
    embed_version: str
    dimensions: int
    max_tokens: int

    def embed(self, texts: list[str], *, urgent: bool = False) -> np.ndarray:
        """Return one row per text, shape (len(texts), dimensions).

        urgent calls (a search query) run before waiting batch work.
        """
        ...


class PriorityLock:
    """Mutual exclusion in which urgent holders go before waiting normal ones.

    The model runs one call at a time. Without priorities a search query
    would queue behind every waiting ingestion batch.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._busy = False
        self._urgent_waiting = 0

    @contextlib.contextmanager
    def hold(self, *, urgent: bool = False) -> Iterator[None]:
        """Block until the lock is free for this caller, then hold it."""
        with self._condition:
            if urgent:
                self._urgent_waiting += 1
            try:
                while self._busy or (not urgent and self._urgent_waiting):
                    self._condition.wait()
            finally:
                if urgent:
                    self._urgent_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._condition:
                self._busy = False
                self._condition.notify_all()


def file_sha256(path: Path) -> str:
    """Return the sha256 of a file in lowercase hex."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentenceTransformersBackend:
    """A sentence-transformers model loaded from a local folder, offline."""

    name = "sentence-transformers"

    def __init__(self, model_dir: Path, *, threads: int = 0) -> None:
        # The model is on disk; never let the hub client reach the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        # A service log has no use for a terminal progress bar.
        transformers.utils.logging.disable_progress_bar()

        if threads > 0:
            torch.set_num_threads(threads)
        self._model = SentenceTransformer(str(model_dir), device="cpu")
        # torch modules are not safe to call from several threads at once.
        self._lock = PriorityLock()
        dimensions = self._model.get_embedding_dimension()
        if dimensions is None:
            raise ValueError(f"model at {model_dir} does not report its dimensions")
        self.dimensions = int(dimensions)
        self.max_tokens = int(self._model.max_seq_length)
        self.embed_model = (
            model_dir.name if model_dir.name != "model" else "all-MiniLM-L6-v2"
        )
        weights = next(
            (
                model_dir / name
                for name in ("model.safetensors", "pytorch_model.bin")
                if (model_dir / name).exists()
            ),
            None,
        )
        weights_sha = file_sha256(weights)[:12] if weights else "unknown"
        # The version pins the weights, the input limit and the unit
        # normalization, which together decide the vectors.
        self.embed_version = f"w-{weights_sha}-seq{self.max_tokens}-unit"

    def embed(self, texts: list[str], *, urgent: bool = False) -> np.ndarray:
        with self._lock.hold(urgent=urgent):
            vectors = self._model.encode(
                texts,
                batch_size=len(texts) or 1,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)


@functools.lru_cache(maxsize=4)
def load_sentence_transformers(
    model_dir: Path, threads: int = 0
) -> SentenceTransformersBackend:
    """Load a model once per process; later calls share it."""
    return SentenceTransformersBackend(model_dir, threads=threads)


def validate_vectors(vectors: np.ndarray, expected_rows: int, dimensions: int) -> None:
    """Raise ValueError unless vectors has one finite row per input."""
    if vectors.ndim != 2 or vectors.shape[0] != expected_rows:
        raise ValueError(
            f"backend returned {vectors.shape[0] if vectors.ndim else 0} vectors for "
            f"{expected_rows} texts"
        )
    if vectors.shape[1] != dimensions:
        raise ValueError(
            f"backend returned vectors of {vectors.shape[1]} dimensions; expected {dimensions}"
        )
    if not np.isfinite(vectors).all():
        raise ValueError("backend returned a vector containing NaN or infinity")
