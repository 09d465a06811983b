import os
import shutil
import tempfile

import numpy as np
import pytest

import prepare_c4


def pytest_configure(config):
    """The compile tests' inductor cache is the suite's own, made afresh (the processes the tests start inherit it):
    a stale cache in /tmp from another run can neither hide nor cause a failure."""
    config.inductor_cache = tempfile.mkdtemp(prefix="sinkgd-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = config.inductor_cache
    # A process the tests start that aborts (SIGABRT, SIGSEGV) prints every thread's Python stack into its stderr,
    # which the failing test shows: a rank that once aborted at exit in CI left only "terminate called".
    os.environ["PYTHONFAULTHANDLER"] = "1"


def pytest_unconfigure(config):
    shutil.rmtree(config.inductor_cache, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Shards of random GPT-2 token ids: 20k train, 2k val (test_train.py has a learnable corpus instead)."""
    path = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    prepare_c4.write_shard(path / "train_000000.bin", rng.integers(0, 50257, 20_000, dtype=np.uint16))
    prepare_c4.write_shard(path / "val_000000.bin", rng.integers(0, 50257, 2_000, dtype=np.uint16))
    return path


@pytest.fixture(scope="module")
def learnable_data_dir(tmp_path_factory):
    """A learnable GPT-2-token corpus: one short document over and over, 12k tokens; its first 792 for validation."""
    enc = prepare_c4.gpt2_encoding()
    doc = [prepare_c4.EOT_TOKEN] + enc.encode_ordinary("The quick brown fox jumps over the lazy dog. " * 3)
    tokens = np.array(doc * (12_000 // len(doc)), dtype=np.uint16)
    path = tmp_path_factory.mktemp("learnable")
    prepare_c4.write_shard(path / "train_000000.bin", tokens)
    prepare_c4.write_shard(path / "val_000000.bin", tokens[:792])
    return path
