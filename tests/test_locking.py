"""One writer per store: real processes, real locks."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.store.locking import owner_path, store_lock
from featurestore.utils.atomic import atomic_path, temp_files_of

ARGS = ["--image-size", "32", "--crop-pct", "1.0", "--batch-size", "8", "--workers", "0", "--device", "cpu",
        "--engine", "torch", "--no-progress"]


def extract_cmd(folder, out, *extra):
    return [sys.executable, "-m", "featurestore.cli", "extract", "--data", str(folder), "--out", str(out),
            *ARGS, *extra]


def rows(path):
    store = FeatureStore(path)
    return {(split, rel): (cid, feature) for split in store.splits
            for rel, cid, feature in zip(store.paths(split), store.ids(split), store.load(split)[0], strict=True)}


def wait_until_waiting(log_file, process, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while "waiting for pid" not in log_file.read_text():
        assert process.poll() is None, log_file.read_text()
        assert time.monotonic() < deadline, "the writer never reached the lock"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_writers_on_one_store_give_the_single_run_result(fashion_folder, tmp_path):
    """Two real extract processes start on one store while it is locked; both queue, then run one after the
    other, and the store equals a single run's, row for row."""
    out = tmp_path / "shared.h5"
    writers = []
    with store_lock(out):  # this test holds the store, so both writers must queue behind it
        refused = subprocess.run(extract_cmd(fashion_folder, out, "--no-wait"), capture_output=True, text=True)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"another featurestore process is writing this store: pid {os.getpid()}" in refused.stderr
        for name in ("a", "b"):
            log_file = tmp_path / f"{name}.log"
            with open(log_file, "wb") as stderr:
                process = subprocess.Popen(extract_cmd(fashion_folder, out, "--json"), stdout=subprocess.PIPE,
                                           stderr=stderr)
            writers.append((process, log_file))
        for process, log_file in writers:
            wait_until_waiting(log_file, process)
        assert not out.exists()
    summaries = []
    for process, log_file in writers:
        stdout, _ = process.communicate(timeout=600)
        assert process.returncode == 0, log_file.read_text()
        summaries.append(json.loads(stdout))
    assert sorted((s["extracted"], s["reused"]) for s in summaries) == [(0, 40), (40, 0)]  # one after the other

    reference = tmp_path / "single.h5"
    subprocess.run(extract_cmd(fashion_folder, reference), check=True, capture_output=True)
    shared, single = rows(out), rows(reference)
    assert shared.keys() == single.keys()
    for key, (cid, feature) in single.items():
        assert shared[key][0] == cid and np.array_equal(shared[key][1], feature)
    assert not temp_files_of(out) and not owner_path(out).exists()
    assert not (tmp_path / "shared.h5.partial").exists()


def test_temporary_files_are_unique_and_never_left_behind(tmp_path):
    target = tmp_path / "file.bin"
    with atomic_path(target) as a, atomic_path(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_bytes(b"first")
        b.write_bytes(b"second")
    assert target.read_bytes() == b"first" and not temp_files_of(target)  # the last to finish wins, whole
    with pytest.raises(RuntimeError), atomic_path(target) as c:
        c.write_bytes(b"half-written")
        raise RuntimeError("killed")
    assert target.read_bytes() == b"first" and not temp_files_of(target)
