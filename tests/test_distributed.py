"""Extraction under torchrun: 2 CPU processes (gloo) on the real weights; the same store as one process, and
resumption after a rank is killed, by a rerun or by torchrun's own restart."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featurestore import FeatureStore

pytestmark = pytest.mark.slow

ARGS = ["--image-size", "96", "--crop-pct", "1.0", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--engine", "torch", "--no-progress", "--json"]
# Native resolution, two images a batch: slow enough that a rank can be killed in the middle of its share.
SLOW = ["--image-size", "224", "--batch-size", "2"]


def extract(folder, out, *launch, extra=()):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", *launch, "-m", "featurestore.cli",
               "extract", "--data", str(folder), "--out", str(out), *ARGS, *extra]
    return command


def finish(process, timeout=300):
    """communicate(), killing the whole launch (torchrun and its workers) if it hangs."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def rows(path):
    store = FeatureStore(path)
    return store.fingerprint_hash, {split: store.load(split) + (list(store.paths(split)),) for split in store.splits}


def assert_same_store(a, b):
    fingerprint_a, splits_a = rows(a)
    fingerprint_b, splits_b = rows(b)
    assert fingerprint_a == fingerprint_b and splits_a.keys() == splits_b.keys()  # the rank count is not in it
    for split, (X, y, ids, paths) in splits_a.items():
        X2, y2, ids2, paths2 = splits_b[split]
        assert list(ids) == list(ids2) and paths == paths2 and np.array_equal(y, y2)  # row for row
        # Equal to float32 rounding: each rank runs one thread on other batches than the single process, which
        # changes the order of the sums (measured max difference 1.2e-5; engines agree to ~1e-5 likewise).
        np.testing.assert_allclose(X, X2, rtol=1e-4, atol=5e-5)



def test_cpu_ranks_share_their_own_nodes_cores_not_the_whole_groups(monkeypatch):
    from featurestore.extract.distributed import Group, threads_per_rank, torchrun_group

    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert torchrun_group() == Group(rank=5, world_size=8, local_rank=1, local_world_size=2)
    # 4 nodes × 2 ranks, 16 cores each: a rank gets half its node, not a sixteenth
    assert threads_per_rank(Group(rank=5, world_size=8, local_rank=1, local_world_size=2), cores=16) == 8
    assert threads_per_rank(Group(rank=0, world_size=1, local_rank=0, local_world_size=1), cores=16) == 16
    assert threads_per_rank(Group(rank=3, world_size=64, local_rank=3, local_world_size=64), cores=16) == 1

@pytest.fixture
def single(fashion_folder, tmp_path):
    out = tmp_path / "single.h5"
    subprocess.run([sys.executable, "-m", "featurestore.cli", "extract", "--data", str(fashion_folder), "--out",
                    str(out), *ARGS], check=True, capture_output=True)
    return out


@pytest.fixture
def single_native(fashion_folder, tmp_path):
    out = tmp_path / "single224.h5"
    subprocess.run([sys.executable, "-m", "featurestore.cli", "extract", "--data", str(fashion_folder), "--out",
                    str(out), *ARGS, *SLOW], check=True, capture_output=True)
    return out


def test_two_ranks_give_the_single_process_store(fashion_folder, tmp_path, single):
    out = tmp_path / "two.h5"
    result = subprocess.run(extract(fashion_folder, out, "--nproc-per-node=2"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["extracted"] == 40  # rank 0 reports for the group
    assert "2 ranks" in summaries[0]["device"]
    assert_same_store(single, out)
    assert not (tmp_path / "two.h5.partial").exists()
    shortcut = subprocess.run([sys.executable, "-m", "featurestore.cli", "extract", "--data", str(fashion_folder),
                               "--out", str(out), "--nproc", "2", *ARGS], capture_output=True, text=True)
    assert shortcut.returncode == 0, shortcut.stderr[-3000:]
    assert json.loads(shortcut.stdout.strip().splitlines()[-1])["reused"] == 40


def worker_pids(rank: int) -> list[int]:
    """PIDs of torchrun workers of ``rank`` running featurestore (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"featurestore.cli" in cmdline and f"RANK={rank}".encode() in environ and b"torch.distributed.run" \
                not in cmdline:
            found.append(int(entry.name))
    return found


def kill_rank_after_parts(process, out: Path, rank: int, parts: int, timeout: float = 180.0) -> None:
    journal = Path(str(out) + ".partial")
    deadline = time.monotonic() + timeout
    while len(list(journal.rglob(f"rank{rank}-part-*.npz"))) < parts:
        assert process.poll() is None, "the extraction finished before a rank could be killed"
        assert time.monotonic() < deadline, "rank journal parts never appeared"
        time.sleep(0.02)
    pids = worker_pids(rank)
    assert pids, "rank process not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_a_killed_rank_loses_only_its_unfinished_batches(fashion_folder, tmp_path, single_native, monkeypatch):
    monkeypatch.setenv("FEATURESTORE_JOURNAL_ROWS", "2")  # a part per batch of 2, as the kill counts them
    out = tmp_path / "killed.h5"
    process = subprocess.Popen(extract(fashion_folder, out, "--nproc-per-node=2", extra=SLOW), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    kill_rank_after_parts(process, out, rank=1, parts=2)
    finish(process)
    assert process.returncode != 0  # no restarts allowed: the group fails
    journaled = sum(len(np.load(part)["ids"]) for part in Path(str(out) + ".partial").rglob("*.npz"))
    assert 4 <= journaled < 40 and not out.exists()
    rerun = subprocess.run(extract(fashion_folder, out, "--nproc-per-node=2", extra=SLOW), capture_output=True,
                           text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == journaled and summary["resumed"] + summary["extracted"] == 40
    assert_same_store(single_native, out)


def test_torchrun_restarts_resume_by_themselves(fashion_folder, tmp_path, single_native, monkeypatch):
    monkeypatch.setenv("FEATURESTORE_JOURNAL_ROWS", "2")
    out = tmp_path / "restarted.h5"
    process = subprocess.Popen(extract(fashion_folder, out, "--nproc-per-node=2", "--max-restarts=1", extra=SLOW),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    kill_rank_after_parts(process, out, rank=1, parts=2)
    stdout, stderr = finish(process)
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["resumed"] >= 4 and summary["resumed"] + summary["extracted"] == 40
    assert_same_store(single_native, out)
