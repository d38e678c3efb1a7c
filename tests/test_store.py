import h5py
import numpy as np
import pytest

from featurestore.errors import StoreError
from featurestore.store.hdf5 import FeatureStore, SplitArrays, chunk_rows, fingerprint_hash, write_store

FINGERPRINT = {"backbone": "demo", "feature_dim": 1280, "weights_sha256": "0" * 64, "dtype": "float32"}


def make_split(n: int, seed: int) -> SplitArrays:
    rng = np.random.default_rng(seed)
    return SplitArrays(
        features=rng.standard_normal((n, 1280)).astype(np.float32),
        labels=rng.integers(0, 3, n),
        ids=[f"{seed:02d}{i:062d}" for i in range(n)],
        paths=[f"train/c/ü{i}.png" for i in range(n)],
    )


def test_roundtrip_layout_and_reader(tmp_path):
    train, val = make_split(500, 1), make_split(7, 2)
    path = write_store(tmp_path / "s.h5", FINGERPRINT, ["a", "b", "c"], {"train": train, "val": val})
    store = FeatureStore(path)
    assert store.splits == ["train", "val"]
    assert store.class_names == ["a", "b", "c"]
    assert store.fingerprint == FINGERPRINT and store.fingerprint_hash == fingerprint_hash(FINGERPRINT)
    X, y, ids = store.load("train")
    assert X.dtype == np.float32 and X.shape == (500, 1280)
    assert np.array_equal(X, train.features) and np.array_equal(y, train.labels) and list(ids) == train.ids
    assert list(store.paths("train")) == train.paths
    with h5py.File(path) as handle:
        features = handle["train/features"]
        assert features.compression is None
        assert features.chunks == (204, 1280)  # about 1 MiB of rows
        assert handle["train/labels"].dtype == np.int64
    assert not (tmp_path / "s.h5.tmp").exists()
    info = store.info()
    assert info["splits"]["val"]["count"] == 7 and info["feature_dim"] == 1280


def test_float16_storage(tmp_path):
    split = make_split(10, 3)
    store = FeatureStore(write_store(tmp_path / "h.h5", FINGERPRINT, ["a"], {"test": split}, dtype="float16"))
    X, _, _ = store.load("test")
    assert X.dtype == np.float16
    assert np.allclose(X, split.features, atol=1e-2)
    assert chunk_rows(1280, 2, 10_000) == 409


def test_a_rewrite_replaces_the_file_atomically(tmp_path):
    path = tmp_path / "s.h5"
    write_store(path, FINGERPRINT, ["a"], {"train": make_split(5, 1)})
    inode_before = path.stat().st_ino
    write_store(path, FINGERPRINT, ["a"], {"train": make_split(3, 2)})
    assert path.stat().st_ino != inode_before  # a new file renamed into place, never edited in place
    assert FeatureStore(path).load("train")[0].shape == (3, 1280)


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        FeatureStore(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="junk.h5: not a readable HDF5 file"):
        FeatureStore(junk)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a featurestore file"):
        FeatureStore(foreign)
    store = FeatureStore(write_store(tmp_path / "s.h5", FINGERPRINT, ["a"], {"train": make_split(2, 1)}))
    with pytest.raises(StoreError, match="no split 'test'"):
        store.load("test")


def test_ids_come_back_as_the_same_strings_as_a_plain_decode():
    from featurestore.store.hdf5 import ascii_to_str

    raw = np.array([b"ab", b"c", b"", b"0123456789abcdef"], dtype="S16")
    widened = ascii_to_str(raw)
    assert widened.dtype == np.dtype("U16")
    assert widened.tolist() == ["ab", "c", "", "0123456789abcdef"]
    assert widened[0] == "ab" and widened[2] == ""
    with pytest.raises(UnicodeDecodeError):  # not ASCII: the same error as astype(str), never wrong text
        ascii_to_str(np.array(["é".encode()], dtype="S4"))
