"""Throughput of the prepare_c4 pipeline against bare tiktoken on the same texts.

The pipeline reads the .json.gz files, tokenises them with --workers processes and writes
shards. The baseline is enc.encode_ordinary_batch(texts, num_threads=workers) on the same
texts already in memory: the most the pipeline could reach. Both are reported in text
tokens per second (the <|endoftext|> separators the pipeline adds are not counted), best
of --repeats runs; the target is a ratio of at least 0.8.

    python -m tools.bench_tokenize [--input FILE ...] [--workers N] [--copies N]
    python -m tools.bench_tokenize --input ../shared/data/c4-sample.00000-of-00001.json.gz   # C4 text
"""
import argparse
import contextlib
import gzip
import io
import json
import os
import tempfile
import time
from pathlib import Path

from prepare_c4 import LineCounts, expand_inputs, gpt2_encoding, prepare_files, read_c4_file, stdlib_docstrings


def seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="C4-format files (default: the demo corpus, written as one such file)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--copies", type=int, default=8,
                        help="read the input this many times, so fixed costs don't dominate a small sample")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.input:
            paths = expand_inputs(args.input)
        else:
            paths = [Path(tmp, "demo.jsonl.gz")]
            with gzip.open(paths[0], "wt", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": text}) + "\n" for text in stdlib_docstrings())
        paths *= args.copies
        texts = [text for path in paths for text in read_c4_file(path, LineCounts())]
        enc = gpt2_encoding()

        text_tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=args.workers)))

        def run_baseline():
            enc.encode_ordinary_batch(texts, num_threads=args.workers)

        def run_pipeline():
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines would drown the result
                summary = prepare_files(paths, Path(tmp, "shards"), workers=args.workers)
            assert sum(summary.tokens.values()) == text_tokens + len(texts)  # same work as the baseline

        # Alternate the two so that load from other processes hits both alike.
        timings = [(seconds(run_baseline), seconds(run_pipeline)) for _ in range(args.repeats)]
        baseline_s, pipeline_s = map(min, zip(*timings))

    print(f"input: {len(texts):,} documents, {text_tokens:,} tokens "
          f"({len(paths) // args.copies} file(s) x {args.copies}), workers: {args.workers}")
    print(f"encode_ordinary_batch, texts in memory: {text_tokens / baseline_s / 1e6:6.2f}M tokens/s "
          f"({baseline_s:.2f}s)")
    print(f"prepare_c4 pipeline, .json.gz -> shards: {text_tokens / pipeline_s / 1e6:6.2f}M tokens/s "
          f"({pipeline_s:.2f}s)")
    print(f"ratio: {baseline_s / pipeline_s:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()
