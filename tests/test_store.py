import os

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


def test_a_store_replaced_during_a_load_is_read_whole_from_one_file(tmp_path, monkeypatch):
    """extract renames a new store over the old one; a load running meanwhile must not mix their bytes (it planned
    chunk offsets on one file and read them from the path, i.e. from the other file, and labels from the first)."""
    import featurestore.store.hdf5 as hdf5

    path, replacement = tmp_path / "s.h5", tmp_path / "new.h5"
    old_split, new_split = make_split(600, 1), make_split(600, 2)
    new_split.labels = (old_split.labels + 1) % 3  # every array differs between the two files
    write_store(path, FINGERPRINT, ["a", "b", "c"], {"train": old_split})
    write_store(replacement, FINGERPRINT, ["a", "b", "c"], {"train": new_split})
    store = FeatureStore(path)
    original, replaced = hdf5.contiguous_runs, []

    def replace_then_plan(*args, **kwargs):  # runs after the chunk index is read, before the bytes are
        if not replaced:
            os.replace(replacement, path)
            replaced.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(hdf5, "contiguous_runs", replace_then_plan)
    X, y, ids = store.load("train")
    assert replaced, "the fast reader no longer plans runs: move the replacement to what it calls in between"
    arrays = {"old": old_split, "new": new_split}
    whole = [name for name, split in arrays.items()
             if np.array_equal(X, split.features) and np.array_equal(y, split.labels) and list(ids) == split.ids]
    assert whole == ["old"], "features, labels and ids must all come from the file the call opened"
    assert np.array_equal(FeatureStore(path).load("train")[0], new_split.features)  # the next call: the new file


@pytest.mark.parametrize("stored", ["float16", "float32"])
def test_load_converts_to_the_dtype_asked_for(tmp_path, stored):
    split = make_split(700, 4)
    store = FeatureStore(write_store(tmp_path / "h.h5", FINGERPRINT, ["a", "b", "c"], {"train": split}, dtype=stored))
    with h5py.File(store.path) as handle:
        expected = handle["train/features"][...]
    assert store.load("train")[0].dtype == np.dtype(stored)  # no dtype: the stored one
    X, y, ids = store.load("train", dtype=np.float32)
    assert X.dtype == np.float32 and X.shape == (700, 1280)
    assert np.array_equal(X, expected.astype(np.float32)) and np.array_equal(y, split.labels) and list(ids) == split.ids
    half = store.load("train", dtype="float16")[0]
    assert half.dtype == np.float16 and np.array_equal(half, expected.astype(np.float16))


def test_a_converting_load_reads_in_bounded_pieces(tmp_path, monkeypatch):
    import featurestore.store.hdf5 as hdf5

    split = make_split(1000, 5)
    store = FeatureStore(write_store(tmp_path / "h.h5", FINGERPRINT, ["a"], {"train": split}, dtype="float16"))
    monkeypatch.setattr(hdf5, "CONVERT_BYTES", 3 * 1280 * 2 + 5)  # 3 rows a piece: pieces cross chunk runs
    X = store.load("train", dtype=np.float64)[0]
    assert X.dtype == np.float64 and np.array_equal(X, split.features.astype(np.float16).astype(np.float64))
