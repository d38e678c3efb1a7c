"""Files replaced whole get the permissions an ordinary ``open(path, "w")`` would give them."""

import os
import stat

import numpy as np
import pytest

from featurestore.configs import HeadConfig
from featurestore.store import SplitArrays, write_store
from featurestore.utils.atomic import atomic_path, write_text_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_0644_under_umask_022(tmp_path, umask_022):
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as handle:
        handle.write("x")
    assert mode(write_text_atomic(tmp_path / "decision.json", "{}")) == mode(plain) == 0o644


def test_a_replaced_file_keeps_its_own_mode(tmp_path, umask_022):
    shared = tmp_path / "shared.json"
    shared.write_text("old")
    os.chmod(shared, 0o664)  # group-writable on purpose
    write_text_atomic(shared, "new")
    assert mode(shared) == 0o664 and shared.read_text() == "new"


def test_stores_heads_and_binary_writes_are_readable_by_the_team(tmp_path, umask_022):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from featurestore.heads.head import TrainedHead
    from featurestore.heads.scaling import FeatureScaler

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 2
    fingerprint = {"backbone": "test", "feature_dim": 4}
    store = write_store(tmp_path / "f.h5", fingerprint, ["a", "b"],
                        {"train": SplitArrays(X, y, [f"{i:064x}" for i in range(20)], [f"{i}.png" for i in range(20)])})
    assert mode(store) == 0o644
    estimator = Pipeline([("scale", FeatureScaler()), ("classify", LogisticRegression())]).fit(X, y)
    head = TrainedHead(estimator, HeadConfig(), 1.0, ["a", "b"], 4, "h", fingerprint, str(store))
    assert mode(head.save(tmp_path / "h.skops")) == 0o644
    with atomic_path(tmp_path / "blob.bin") as tmp:
        tmp.write_bytes(b"\0")
    assert mode(tmp_path / "blob.bin") == 0o644
