"""The sentence-transformers model run by ONNX Runtime instead of torch.

The transformer of a sentence-transformers folder is exported to ONNX once,
at first use, into a cache folder; later starts load the exported file.
For a BERT model the export then fuses each layer's attention and GELU,
and the embedding layer norm, into ONNX Runtime's own transformer
operators, which run about a quarter faster on a CPU. The other layer norms
stay standard LayerNormalization nodes (see ``_fuse_if_equal``). The fused
graph is kept only when its vectors match the plain graph's on a padded
sample batch. Otherwise the plain graph is used. The file's metadata
records which one it contains.
Tokenization uses the folder's ``tokenizer.json`` with the model's input
limit, and pooling follows ``1_Pooling/config.json`` (mean pooling over the
attention mask), then every vector is scaled to unit length, as
sentence-transformers does with ``normalize_embeddings=True``. The vectors
differ from torch's in the last float32 bits, so this backend has its own
``embed_version``.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from services.embedder.backends import PriorityLock, file_sha256

log = logging.getLogger(__name__)

# Opset of the exported graph. 17 is supported by every ONNX Runtime release
# since 1.14 and covers every operator of a BERT encoder.
ONNX_OPSET = 17

# Texts per ONNX Runtime call, after sorting each call's texts by token
# count. Small sub-batches pad least: on 640 corpus chunks, sub-batches of 2
# ran about 6 % faster than sub-batches of 8 and 3 % faster than single texts.
SUB_BATCH_SIZE = 2

# Bumped when the export changes the graph it writes, so a cached file from
# an older export is not reused. It is part of embed_version, because a
# changed graph changes the vectors' last bits.
EXPORT_REVISION = 3

# ONNX Runtime's graph optimizations that the session leaves out.
# SkipLayerNormFusion would merge each residual Add and the LayerNormalization
# after it into one SkipLayerNormalization node. Its CPU kernel normalizes
# each row in a scalar loop. On one layer's input of 2 x 190 x 384 floats it
# took 295 us, and the Add and LayerNormalization it replaces took 49 us.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)

# Metadata key of the exported file that names its graph: "fused" or "plain".
GRAPH_METADATA_KEY = "ingestd.graph"

# The fused graph is kept only if every sample vector has at least this
# cosine similarity with the plain graph's.
FUSED_MIN_COSINE = 0.99999

# The sample the fused graph is checked on: texts of different lengths, so
# the batch is padded and the attention mask matters.
_FUSION_SAMPLE = (
    "ingestd",
    "A job resumes from its last durable step after a crash.",
    "Each stage claims jobs with a lease and renews it while it works; " * 12,
)

_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(model_dir: Path, destination: Path) -> None:
    """Export the transformer of a sentence-transformers folder to ONNX.

    The file is written under a temporary name and renamed into place, so a
    reader sees either no file or a complete one.
    """
    import torch
    from transformers import AutoModel

    # The eager attention traces to plain MatMul and Softmax nodes, which the
    # fusion step recognizes as attention. The default attention (scaled dot
    # product) traces to a pattern it does not recognize.
    model = AutoModel.from_pretrained(
        str(model_dir), attn_implementation="eager"
    ).eval()

    class _LastHiddenState(torch.nn.Module):
        # transformers 5 takes more positional arguments than the three
        # inputs, so the wrapper passes them by name.
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state

    sample = torch.ones(2, 16, dtype=torch.long)
    axes = {name: {0: "batch", 1: "tokens"} for name in _INPUT_NAMES}
    axes["last_hidden_state"] = {0: "batch", 1: "tokens"}
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=destination.parent, prefix=destination.name, suffix=".tmp"
    )
    os.close(handle)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about Python conditions in transformers' mask
            # code. They depend only on whether a mask is given, and one
            # always is, so the traced graph is valid for every shape.
            warnings.simplefilter("ignore")
            # dynamo=False selects the TorchScript exporter, which needs only
            # the onnx package; the dynamo exporter also needs onnxscript.
            torch.onnx.export(
                _LastHiddenState(model),
                (sample, sample, torch.zeros_like(sample)),
                temporary,
                input_names=list(_INPUT_NAMES),
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        _fuse_if_equal(model_dir, Path(temporary))
        # mkstemp creates the file readable by its owner only; replicas that
        # share the folder may run as other users.
        os.chmod(temporary, 0o644)
        # The model file goes into place first: a crash before the hash file
        # follows leaves a model without a hash, which a later start
        # exports again.
        digest = file_sha256(Path(temporary))
        os.replace(temporary, destination)
        hash_path(destination).write_text(digest + "\n", encoding="ascii")
    finally:
        Path(temporary).unlink(missing_ok=True)


def hash_path(onnx_path: Path) -> Path:
    """Return the file that records the sha256 of an exported model."""
    return onnx_path.with_name(onnx_path.name + ".sha256")


def export_is_intact(onnx_path: Path) -> bool:
    """True when the exported file exists and matches its recorded sha256."""
    try:
        recorded = hash_path(onnx_path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        # Missing, unreadable or not a file: the export writes it anew, and
        # fails with the path if it cannot.
        return False
    return onnx_path.is_file() and file_sha256(onnx_path) == recorded


def _fuse_if_equal(model_dir: Path, path: Path) -> None:
    """Rewrite the plain graph at ``path`` as a fused one if its vectors match.

    Only BERT models are fused. The graph kind is stored in the file's
    metadata either way.
    """
    import onnx

    config = _read_json(model_dir / "config.json")
    plain = onnx.load(str(path))
    graph = "plain"
    if config.get("model_type") == "bert":
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        # The residual Add and LayerNormalization are left as they are, for
        # the reason given at DISABLED_OPTIMIZERS. Without SkipLayerNormalization
        # nodes the model embedded corpus chunks about 13 % faster.
        fusion_options = FusionOptions("bert")
        fusion_options.enable_skip_layer_norm = False
        fused = optimize_model(
            str(path),
            model_type="bert",
            num_heads=int(config["num_attention_heads"]),
            hidden_size=int(config["hidden_size"]),
            # Level 0: only the transformer fusions; ONNX Runtime applies its
            # own graph optimizations when it loads the file.
            opt_level=0,
            use_gpu=False,
            optimization_options=fusion_options,
        ).model
        cosine = _lowest_cosine(model_dir, plain, fused)
        if cosine >= FUSED_MIN_COSINE:
            plain, graph = fused, "fused"
        else:
            log.warning(
                "the fused ONNX graph does not match the plain one; keeping the plain graph",
                extra={"event": "onnx_fusion_rejected", "cosine": cosine},
            )
    onnx.helper.set_model_props(plain, {GRAPH_METADATA_KEY: graph})
    onnx.save(plain, str(path))


def _lowest_cosine(model_dir: Path, first, second) -> float:
    """Return the lowest cosine similarity of the sample's vectors under two graphs."""
    import onnxruntime
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=128)
    tokenizer.no_padding()
    encodings = tokenizer.encode_batch(list(_FUSION_SAMPLE))
    vectors = []
    for model in (first, second):
        session = onnxruntime.InferenceSession(
            model.SerializeToString(),
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
        vectors.append(_pooled(session, encodings))
    return float((vectors[0] * vectors[1]).sum(axis=1).min())


def _pooled(session, encodings: list) -> np.ndarray:
    """Run one padded batch and return its unit-length mean-pooled vectors."""
    width = max(len(encoding.ids) for encoding in encodings)
    shape = (len(encodings), width)
    input_ids = np.zeros(shape, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    token_type_ids = np.zeros(shape, dtype=np.int64)
    for row, encoding in enumerate(encodings):
        length = len(encoding.ids)
        input_ids[row, :length] = encoding.ids
        attention_mask[row, :length] = 1
        token_type_ids[row, :length] = encoding.type_ids
    (hidden,) = session.run(
        None,
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
        },
    )
    mask = attention_mask[:, :, None].astype(np.float32)
    summed = (hidden * mask).sum(axis=1)
    mean = summed / np.clip(mask.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(mean, axis=1, keepdims=True)
    return (mean / np.clip(norms, 1e-12, None)).astype(np.float32)


def open_session(path: Path, threads: int, *, optimized_path: Path | None = None):
    """Open an ONNX Runtime CPU session on an exported model.

    With ``optimized_path`` the session also writes the graph it runs, after
    ONNX Runtime's own optimizations, to that file.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Sub-batches come in many widths, since each is padded to its longest
    # text, and the memory pattern planner keeps a plan for every input
    # shape it has seen. Without it the run time was the same on the
    # benchmark machine. The arena stays on: without it each run took twice
    # as long.
    options.enable_mem_pattern = False
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return onnxruntime.InferenceSession(
        str(path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )


def _read_json(path: Path) -> dict:
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


class OnnxBackend:
    """A sentence-transformers model folder run by ONNX Runtime on the CPU."""

    name = "onnx"

    def __init__(self, model_dir: Path, cache_dir: Path, *, threads: int = 0) -> None:
        from tokenizers import Tokenizer

        pooling = _read_json(model_dir / "1_Pooling" / "config.json")
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(
                f"model at {model_dir} does not use mean pooling; the onnx backend "
                "supports only mean pooling"
            )
        self.dimensions = int(pooling["word_embedding_dimension"])
        self.max_tokens = int(
            _read_json(model_dir / "sentence_bert_config.json")["max_seq_length"]
        )
        self.embed_model = (
            model_dir.name if model_dir.name != "model" else "all-MiniLM-L6-v2"
        )
        weights = model_dir / "model.safetensors"
        if not weights.exists():
            raise FileNotFoundError(
                f"{weights} is missing; the onnx backend exports from safetensors weights"
            )
        weights_sha = file_sha256(weights)[:12]
        self.onnx_path = cache_dir / (
            f"{self.embed_model}-{weights_sha}-opset{ONNX_OPSET}-r{EXPORT_REVISION}.onnx"
        )
        self._ensure_exported(model_dir, self.onnx_path)

        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json ships with a 128-token limit and fixed padding.
        # sentence-transformers truncates at max_seq_length instead, and
        # _pooled pads each sub-batch to its longest text, as it does.
        self._tokenizer.enable_truncation(max_length=self.max_tokens)
        self._tokenizer.no_padding()

        try:
            self._session = open_session(self.onnx_path, threads)
        except Exception as exc:
            # The file matched its recorded hash, so both were replaced, or
            # ONNX Runtime cannot read what this export wrote.
            raise RuntimeError(
                f"ONNX Runtime failed to load {self.onnx_path}: {exc}. Delete it "
                f"and {hash_path(self.onnx_path).name} beside it, and the next "
                "start exports the model again"
            ) from exc
        # The fused and plain graphs, and the graphs of different export
        # revisions, differ in the last float32 bits, so each has its own
        # version.
        self.graph = self._session.get_modelmeta().custom_metadata_map.get(
            GRAPH_METADATA_KEY, "plain"
        )
        self.embed_version = (
            f"onnx-{self.graph}-r{EXPORT_REVISION}-w-{weights_sha}"
            f"-seq{self.max_tokens}-unit"
        )
        if (
            self.graph != "fused"
            and _read_json(model_dir / "config.json").get("model_type") == "bert"
        ):
            log.warning(
                "the ONNX export of this BERT model contains the plain graph, because "
                "the fused graph's vectors did not match it; embedding runs slower",
                extra={"event": "onnx_unfused", "path": str(self.onnx_path)},
            )
        # One call at a time keeps a search query's priority over batches.
        self._lock = PriorityLock()

    @staticmethod
    def _ensure_exported(model_dir: Path, onnx_path: Path) -> None:
        # A file changed on disk would load and embed wrong vectors under the
        # same version, so the file must match the hash its export recorded.
        if export_is_intact(onnx_path):
            return
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        # Replicas sharing a data folder export once: the others wait on the
        # lock and then find the file.
        with (onnx_path.parent / ".export.lock").open("w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            if export_is_intact(onnx_path):
                return
            if onnx_path.exists():
                log.warning(
                    "the cached ONNX model does not match the hash recorded at its "
                    "export; exporting it again",
                    extra={"event": "onnx_export_damaged", "path": str(onnx_path)},
                )
            # An export killed before it finished leaves its temporary file;
            # under the lock no other export is writing one.
            for stale in onnx_path.parent.glob(f"{onnx_path.name}*.tmp"):
                stale.unlink(missing_ok=True)
            log.info(
                "exporting the embedding model to ONNX",
                extra={"event": "onnx_export", "path": str(onnx_path)},
            )
            export_in_child(model_dir, onnx_path)

    def embed(self, texts: list[str], *, urgent: bool = False) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda index: len(encodings[index].ids))
        vectors = np.empty((len(texts), self.dimensions), dtype=np.float32)
        with self._lock.hold(urgent=urgent):
            for start in range(0, len(order), SUB_BATCH_SIZE):
                group = order[start : start + SUB_BATCH_SIZE]
                vectors[group] = _pooled(
                    self._session, [encodings[index] for index in group]
                )
        return vectors


def export_in_child(model_dir: Path, onnx_path: Path) -> None:
    """Run export_onnx in a child process.

    The export imports torch and transformers and keeps several copies of
    the model in memory while it fuses and checks the graph. In a child process none
    of that stays in the service's memory once the file is written.
    """
    result = subprocess.run(
        [sys.executable, "-m", __name__, str(model_dir), str(onnx_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode < 0:
        raise RuntimeError(
            f"exporting {model_dir} to ONNX was stopped by signal "
            f"{signal.Signals(-result.returncode).name}; start the embedder again "
            "to export anew"
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"exporting {model_dir} to ONNX failed with exit status "
            f"{result.returncode}: {result.stderr.strip()[-2000:]}"
        )


@functools.lru_cache(maxsize=4)
def load_onnx(model_dir: Path, cache_dir: Path, threads: int = 0) -> OnnxBackend:
    """Load (and at first use export) a model once per process; later calls share it."""
    return OnnxBackend(model_dir, cache_dir, threads=threads)


if __name__ == "__main__":
    # Run by export_in_child: MODEL_DIR ONNX_PATH.
    export_onnx(Path(sys.argv[1]), Path(sys.argv[2]))
