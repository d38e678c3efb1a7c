"""The audit at scale (issue 28): the whole ``audit_store`` on a synthetic, clustered store of 100,000 x 1,280
float32 rows, on the 2-core reference machine.

    python benchmarks/audit_scale.py [--rows 100000] [--dim 1280] [--flip 0.05] [--queries 1000] [--workdir DIR]
                                     [--keep]

(``--workdir`` with the store of an earlier run of the same size and ``--flip`` reuses it.)

1. Writes a feature store through the store API (``store_writer``, a block at a time) of ``--rows`` rows split
   80/10/10 into train, val and test, drawn from :class:`SyntheticRows`: 10 classes of 5 clusters each in a
   128-d latent space with a power-law spectrum, mapped linearly to ``--dim`` features, plus isotropic noise,
   through a ReLU. Its parameters were set once so that a 3,500-row sample looks like the default Fashion-MNIST
   store's EfficientNet-Lite0 features (measured there / here, unit rows): 60% / 60% zeros, mean cosine to the
   nearest other row 0.82 / 0.80 and to the 10th 0.75 / 0.74, of random pairs 0.37 / 0.38, the nearest row of
   the same class 80% / 80%, 50% of the variance in 14 / 8 principal components and 90% in 248 / 215. The
   sample's own figures are printed. ``--flip`` of every split's labels are moved to a random other class (as real
   data holds some label noise), and how the audit's ranking and flags find them is printed.
2. Runs ``audit_store`` on it (every step, default settings) in a child process and prints the seconds of each
   step and in all (target: <= 300 s; ``open`` is what comes before the first step: the store's checks and the
   digest of its rows), and the peak resident memory (target: <= 2 GB): the audit process's own (``VmHWM``) and the
   largest of it and any process it started (``getrusage(RUSAGE_CHILDREN)`` in this process, which holds no rows
   while the audit runs).
3. Measures the graph's recall@10 against exact search (target: >= 0.95) on ``--queries`` rows drawn at random
   (another seed than the audit's own recall measurement), here, after the audit: the share of each query's 10
   exact nearest other rows (cosine, brute force) among its first 10 neighbours in the audit's graph.

Timings depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featurestore.store.hdf5 import FeatureStore, SplitArrays, store_writer

BLOCK = 10_000
CLASSES = 10
CLUSTERS = 5  # per class
LATENT = 128
SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
TARGETS = {"seconds": 300.0, "peak_gb": 2.0, "recall_at_10": 0.95}
RECALL_SEED = 12_345  # not the audit's (0): an independent draw of queries

AUDIT_CHILD = """
import json, sys, time
import numpy as np
import featurestore.audit.run as run
graphs = []
build = run.neighbour_graph
def kept(*args, **kwargs):
    graphs.append(build(*args, **kwargs))
    return graphs[-1]
run.neighbour_graph = kept  # the graph the audit builds, for the recall measured after it
started = time.perf_counter()
summary = run.audit_store(sys.argv[1], sys.argv[2], force=True)
seconds = time.perf_counter() - started
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # this process's own peak
np.save(sys.argv[3], graphs[0].indices)
print(json.dumps({"seconds": seconds, "summary": summary, "peak_rss_bytes": int(hwm.split()[1]) * 1024}))
"""


def split_counts(rows: int) -> dict[str, int]:
    """{split: rows}: :data:`SPLITS` of ``rows``, train taking what rounding leaves."""
    counts = {split: int(rows * share) for split, share in SPLITS.items() if split != "train"}
    return {"train": rows - sum(counts.values()), **counts}


class SyntheticRows:
    """Blocks of clustered, non-negative rows (module docstring): ``draw(n)`` gives (n, dim) float32 features and
    (n,) int64 labels, a fresh draw each call from one seeded generator."""

    def __init__(self, dim: int, seed: int = 0, decay: float = 1.4, class_scale: float = 0.3, spread: float = 0.6,
                 within: float = 0.8, noise: float = 0.15, bias: float = -0.3):
        self.rng = np.random.default_rng(seed)
        scales = (1 + np.arange(LATENT)) ** (-decay / 2)  # latent variances fall off as a power law
        scales *= np.sqrt(LATENT / (scales ** 2).sum())
        self.mixing = (self.rng.normal(0, 1 / np.sqrt(LATENT), (LATENT, dim)) * scales[:, None]).astype(np.float32)
        class_means = class_scale * self.rng.normal(0, 1, (CLASSES, LATENT))
        self.centres = class_means[:, None, :] + spread * self.rng.normal(0, 1, (CLASSES, CLUSTERS, LATENT))
        self.offset = (self.rng.normal(0, 0.5, dim) + bias).astype(np.float32)
        self.within, self.noise, self.dim = within, noise, dim

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = self.rng.integers(0, CLASSES, n)
        clusters = self.rng.integers(0, CLUSTERS, n)
        latent = self.centres[labels, clusters] + self.within * self.rng.normal(0, 1, (n, LATENT))
        features = latent.astype(np.float32) @ self.mixing
        features += self.offset
        features += self.noise * self.rng.standard_normal((n, self.dim), dtype=np.float32)
        return np.maximum(features, 0, out=features), labels.astype(np.int64)


def write_synthetic(path: Path, rows: int, dim: int, flip: float) -> list[str]:
    """The store at ``path`` (module docstring), written block by block, with ``flip`` of every split's labels
    moved to a random other class; returns the paths of the flipped rows (the path names the given class)."""
    source = SyntheticRows(dim)
    rng = np.random.default_rng(1)
    fingerprint = {"backbone": "synthetic-clustered", "feature_dim": dim, "kind": "image"}
    flipped = []
    with store_writer(path, fingerprint, [f"class{k}" for k in range(CLASSES)], split_counts(rows)) as writer:
        for split, n in split_counts(rows).items():
            for start in range(0, n, BLOCK):
                features, labels = source.draw(min(BLOCK, n - start))
                moved = rng.random(len(labels)) < flip
                labels[moved] = (labels[moved] + rng.integers(1, CLASSES, int(moved.sum()))) % CLASSES
                ids = [f"{split}{start + i:058d}" for i in range(len(labels))]
                paths = [f"{split}/class{label}/{start + i:06d}.png" for i, label in enumerate(labels)]
                writer.write(split, start, SplitArrays(features, labels, ids, paths))
                flipped += [paths[i] for i in np.flatnonzero(moved)]
    return flipped


def label_figures(issues_csv: Path, flipped: set[str]) -> dict:
    """How the audit's ranking (``label_issues.csv``, most likely issue first) and flags find the planted flips:
    precision of the first rows, as many as were flipped; the flags' recall and precision."""
    with open(issues_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    planted = np.array([r["path"] in flipped for r in rows])
    flagged = np.array([r["is_issue"] == "true" for r in rows])
    hits = int((planted & flagged).sum())
    return {"planted": int(planted.sum()), "precision_at_planted": round(float(planted[:planted.sum()].mean()), 4),
            "flagged": int(flagged.sum()), "recall": round(hits / max(1, int(planted.sum())), 4),
            "precision": round(hits / max(1, int(flagged.sum())), 4)}


def unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def sample_figures(dim: int, rows: int = 3_500) -> dict:
    """The statistics the generator was set by (module docstring), on a fresh sample of ``rows`` rows."""
    X, y = SyntheticRows(dim, seed=1).draw(rows)
    units = unit(X)
    similarities = units @ units.T
    np.fill_diagonal(similarities, -np.inf)
    top = -np.sort(-similarities, axis=1)[:, :10]
    centred = units - units.mean(axis=0)
    variance = np.cumsum(np.linalg.svd(centred, compute_uv=False) ** 2)
    variance /= variance[-1]
    return {"zeros": round(float((X == 0).mean()), 3), "nearest_cosine": round(float(top[:, 0].mean()), 3),
            "tenth_cosine": round(float(top[:, 9].mean()), 3),
            "random_pair_cosine": round(float(similarities[np.isfinite(similarities)].mean()), 3),
            "nearest_same_class": round(float((y[similarities.argmax(axis=1)] == y).mean()), 3),
            "components_50_90": [int(np.searchsorted(variance, q)) + 1 for q in (0.5, 0.9)]}


def recall_at(store_path: str | Path, indices: np.ndarray, queries: int, k: int = 10,
              seed: int = RECALL_SEED) -> float:
    """Mean share of the exact k nearest other rows (cosine, brute force over every row of the store, in the
    audit's row order: split after split) found among the first k of ``indices`` (N, >= k), on ``queries`` rows
    drawn at random. Reads the store a block at a time into one array of unit rows (N, D) float32."""
    store = FeatureStore(store_path)
    units = np.empty((sum(store.count(split) for split in store.splits), store.feature_dim), np.float32)
    start = 0
    for split in store.splits:
        for X, _ in store.iter_chunks(split, BLOCK):
            units[start:start + len(X)] = unit(X.astype(np.float32))
            start += len(X)
    picked = np.sort(np.random.default_rng(seed).choice(len(units), size=min(queries, len(units)), replace=False))
    found = []
    for block in np.array_split(picked, max(1, len(picked) // 100)):  # (100, N) similarities at a time
        similarities = units[block] @ units.T
        similarities[np.arange(len(block)), block] = -np.inf
        exact = np.argpartition(-similarities, k, axis=1)[:, :k]
        found += [len(np.intersect1d(exact[i], indices[row, :k])) for i, row in enumerate(block)]
    return float(np.mean(found) / k)


def run_audit(path: Path, out: Path, queries: int) -> dict:
    """Step 2 in a child process (its own peak memory: this process holds no rows meanwhile), then step 3 here on
    the graph it saved: its seconds, summary, peak RSS and recall@10."""
    indices = out.parent / "graph_indices.npy"
    child = subprocess.run([sys.executable, "-c", AUDIT_CHILD, str(path), str(out), str(indices)],
                           capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"the audit failed:\n{child.stderr[-4000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["tree_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result["recall_at_10"] = recall_at(path, np.load(indices), queries)
    return result


def verdict(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return f"{'meets' if met else 'MISSES'} target {'<=' if at_most else '>='} {target:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=1_000, help="rows whose recall@10 is measured")
    parser.add_argument("--flip", type=float, default=0.05, help="share of every split's labels flipped")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the store and the audit's files")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fs-audit-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path, flips = workdir / "synthetic.h5", workdir / "flipped.json"
    started = time.perf_counter()
    reused = (path.is_file() and flips.is_file() and json.loads(flips.read_text())["flip"] == args.flip
              and FeatureStore(path).count("train") == split_counts(args.rows)["train"])
    if not reused:
        flipped = write_synthetic(path, args.rows, args.dim, args.flip)
        flips.write_text(json.dumps({"flip": args.flip, "paths": flipped}))
    print(json.dumps({"rows": split_counts(args.rows), "dim": args.dim, "store_bytes": path.stat().st_size,
                      "write_seconds": None if reused else round(time.perf_counter() - started, 1),
                      "sample_of_3500": sample_figures(args.dim)}), flush=True)

    load_before = os.getloadavg()
    result = run_audit(path, workdir / "audit", args.queries)
    load_after = os.getloadavg()
    summary = result["summary"]
    steps = summary["seconds"]
    report = {"seconds_total": round(result["seconds"], 1), "ratio_to_target": round(result["seconds"] / 300, 3),
              "seconds_per_step": {"open": round(result["seconds"] - sum(steps.values()), 1),
                                   **{step: round(s, 1) for step, s in steps.items()}},
              "peak_rss_mb": round(result["peak_rss_bytes"] / 2**20),
              "tree_peak_rss_mb": round(result["tree_peak_rss_bytes"] / 2**20),
              "recall_at_10": round(result["recall_at_10"], 4), "queries": args.queries,
              "graph": summary["graph"], "label_issues": summary["label_issues"],
              "planted_flips": label_figures(workdir / "audit" / "label_issues.csv",
                                             set(json.loads(flips.read_text())["paths"])),
              "near_duplicate_pairs": summary["near_duplicates"]["pairs"], "map_rows": summary["map"]["rows"],
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in load_after], "cpus": os.cpu_count()}
    print(json.dumps(report), flush=True)
    peak_gb = max(result["peak_rss_bytes"], result["tree_peak_rss_bytes"]) / 1e9
    graph = summary["graph"]
    print(f"whole audit: {report['seconds_total']} s, {report['ratio_to_target']} of the 300-s target "
          f"({verdict(result['seconds'], TARGETS['seconds'], True)}); per step: "
          + ", ".join(f"{step} {s} s" for step, s in report["seconds_per_step"].items()))
    print(f"peak RSS: audit process {report['peak_rss_mb']} MiB, largest of it and its children "
          f"{report['tree_peak_rss_mb']} MiB ({peak_gb:.2f} GB: {verdict(peak_gb, TARGETS['peak_gb'], True)} GB)")
    print(f"graph {graph['kind']} (k {graph['k']}, its own recall@k {graph['recall']}): "
          f"recall@10 against exact search on {args.queries} queries {report['recall_at_10']} "
          f"({verdict(result['recall_at_10'], TARGETS['recall_at_10'], False)})")
    print(f"label issues with {args.flip:.0%} of the labels flipped: " + ", ".join(
        f"{name} {value}" for name, value in report["planted_flips"].items()))
    print(f"load average (1, 5, 15 min) before {report['load_average_before']}, after {report['load_average_after']} "
          f"on {report['cpus']} CPUs")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
