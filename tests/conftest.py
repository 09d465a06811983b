import numpy as np
import pytest

import prepare_c4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Shards of random GPT-2 token ids: 20k train, 2k val (test_train.py has a learnable corpus instead)."""
    path = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    prepare_c4.write_shard(path / "train_000000.bin", rng.integers(0, 50257, 20_000, dtype=np.uint16))
    prepare_c4.write_shard(path / "val_000000.bin", rng.integers(0, 50257, 2_000, dtype=np.uint16))
    return path
