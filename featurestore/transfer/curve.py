"""Transfer learning's promise, measured against baselines no one can dismiss, per label budget.

For each budget (labels per class, nested subsets of the train split), scored on the test split:

- ``pixels`` (images) or ``tfidf`` (texts): logistic regression on raw pixels, or on TF-IDF word and bigram
  counts, C chosen on val: the floor any method must clear;
- ``scratch``: the same architecture from random weights, every layer training, for the same step budget
  at every label budget, with its own learning rate and input size (``ScratchConfig``), its best
  validation round kept; whether it converged, and by which measure, is recorded per point;
- ``small_cnn`` (images): a small convolutional network from scratch at the data's own resolution (28 px for
  Fashion-MNIST), its learning rate chosen on val from a small grid, every rate's figures and the chosen run's
  per-round validation loss and accuracy recorded (``small_cnn.py``): the from-scratch line a CPU can afford;
- ``linear_probe``: logistic regression on the cached features, C chosen on val;
- ``knn``: the kNN head on the same cached features and rows (``heads.knn``: a vote of the k nearest train rows by
  cosine, weighted by ``exp(similarity / T)``), k and T chosen on val: DINOv2's second line beside the probe;
- ``probe_finetune``: that probe as the classifier, the top blocks fine-tuned from the trunk cache (texts:
  the top transformer layers) with the fine-tuning settings, early-stopped on val;
- ``multilayer``: the multilayer head (``heads.multilayer``) on the same rows of the store's layer store
  (``CurveOptions.layers``, ``extract --layers all``), its layers and C chosen on val;
- ``setfit`` (texts): from that probe, the top transformer layers tuned on pairs of the budget's texts with a
  cosine-similarity loss, then the probe refitted on the tuned embeddings, C on val (``setfit.py``,
  ``SetFitConfig``); its best epoch on val is kept, the probe itself when none beats it.

Per budget, ``picks`` names the transfer line (probe, multilayer head or fine-tune) best on validation, as the
verdict would choose, with its test accuracy. Test accuracy and training wall-clock go to ``curve.json``, a CSV for
``dvc plots`` and two PNGs. The trunk cache is built once for all budgets (its seconds are reported apart, with the
feature extraction they share the cost of); the probes' seconds do not count the one-off feature extraction either.
A text fine-tune counts its own pass of the lower layers over its documents. In a DVC stage (timings routed,
``utils.timings``) the seconds, the CSV's seconds column and the seconds figure go to the timings folder instead.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from ..configs import (
    CURVE_DEFAULTS,
    CURVE_METHODS,
    CURVE_MULTILAYER,
    DEFAULT_CURVE_METHODS,
    TEXT_CURVE_METHODS,
    CurveOptions,
    HeadConfig,
)
from ..configs import CURVE_HEAD as CURVE_HEAD  # re-exported: benchmarks/text_search.py imports it from here
from ..data.sources import budget_shortfall, ids_digest
from ..errors import FeaturestoreError
from ..heads.estimators import build_estimator, choose_c, sweep_c
from ..heads.head import TrainedHead
from ..heads.knn import KNNClassifier, choose_knn, sweep_knn
from ..heads.multilayer import fit_on_val, layer_table, rows_by_id
from ..heads.records import store_source
from ..heads.reports import check_no_overlap
from ..heads.selection import validation_accuracy
from ..store.hdf5 import FeatureStore
from ..utils.timings import timings_path, write_json, write_text_routed
from .probe import probe_rows, records_for, split_rows, train_only_probe

# The kNN line, for either modality: a method of its own beside the probe (named in ``CurveOptions.methods``).
KNN_METHOD = "knn"
MULTILAYER_METHOD = "multilayer"  # the multilayer head on the store's layer store (CurveOptions.layers)
PICK_METHOD = "pick"  # not a method run: per budget, the transfer line best on val (transfer_picks)
PICKED_LINES = ("linear_probe", MULTILAYER_METHOD, "probe_finetune")
METHODS = tuple(dict.fromkeys(CURVE_METHODS + TEXT_CURVE_METHODS + (KNN_METHOD, PICK_METHOD)))
# as run_curve appends them
POINT_ORDER = ("pixels", "tfidf", "linear_probe", KNN_METHOD, MULTILAYER_METHOD, "probe_finetune", "setfit", "scratch",
               "small_cnn", PICK_METHOD)


def fit_probe(store: FeatureStore, budget: int, seed: int, config: HeadConfig) -> tuple[object, float, float, float,
                                                                                        np.ndarray]:
    """(fitted probe, C, test accuracy, seconds, the train rows it fitted) of the logistic-regression probe on
    ``budget`` per class (the store's rows, float32 whatever the stored dtype)."""
    X, y, _ = store.load("train", dtype=np.float32)
    Xv, yv, _ = store.load("val", dtype=np.float32)
    Xt, yt, _ = store.load("test", dtype=np.float32)
    rows = probe_rows(y, budget, seed)
    started = time.perf_counter()
    C = choose_c(sweep_c(config, X[rows], y[rows], Xv, yv))
    probe = build_estimator(config, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(X[rows], y[rows])
    return probe, C, float(probe.score(Xt, yt)), time.perf_counter() - started, rows


def knn_point(store: FeatureStore, rows: np.ndarray) -> dict:
    """The kNN line's figures at one budget: k and T chosen on the val split (:func:`~..heads.knn.sweep_knn`) with
    the train ``rows`` (the probe's) as neighbours, fitted on those rows alone (as the probe is), scored on test:
    ``{"test_accuracy", "val_accuracy", "seconds", "k", "temperature"}``."""
    X, y, _ = store.load("train", dtype=np.float32)
    Xv, yv, _ = store.load("val", dtype=np.float32)
    Xt, yt, _ = store.load("test", dtype=np.float32)
    started = time.perf_counter()
    sweep = sweep_knn(X[rows], y[rows], Xv, yv)
    settings = choose_knn(sweep)
    knn = KNNClassifier(**settings).fit(X[rows], y[rows])
    return {"test_accuracy": float(knn.score(Xt, yt)), "val_accuracy": validation_accuracy(sweep, settings),
            "seconds": round(time.perf_counter() - started, 2), **settings}


def multilayer_point(store: FeatureStore, layers: FeatureStore, rows: np.ndarray) -> dict:
    """The multilayer head's figures at one budget, on ``store``'s train ``rows`` (the probe's) read from its layer
    store ``layers`` by content id: layers and C chosen on val (``heads.multilayer.fit_on_val``), fitted on those rows
    alone, scored on test: ``{"test_accuracy", "val_accuracy", "seconds", "C", "layers"}``."""
    table = layer_table(layers.fingerprint, str(layers.path))
    X, y, ids = store.load("train", dtype=np.float32)
    split = {name: store.load(name, dtype=np.float32) for name in ("val", "test")}
    Xv, Xt = (rows_by_id(layers, name, split[name][2]) for name in ("val", "test"))
    started = time.perf_counter()
    model, settings = fit_on_val(CURVE_MULTILAYER, table, rows_by_id(layers, "train", ids[rows]), y[rows], Xv,
                                 split["val"][1])
    return {"test_accuracy": float(model.score(Xt, split["test"][1])),
            "val_accuracy": float(model.score(Xv, split["val"][1])), "seconds": round(time.perf_counter() - started, 2),
            "C": settings["C"], "layers": settings["selection"]}


def transfer_picks(points: list[dict]) -> list[dict]:
    """Per budget, the transfer line with the best validation accuracy among the linear probe, the multilayer head
    and probe-then-fine-tune (ties: that order, the cheaper first), as the verdict would choose on val: curve.json's
    ``picks``, points of method ``pick`` naming the line (``picked``) with its test accuracy (plotted, and a column
    of :func:`accuracy_table`)."""
    picks = []
    for budget in sorted({p["labels_per_class"] for p in points}):
        lines = [p for p in points if p["labels_per_class"] == budget and p["method"] in PICKED_LINES]
        if lines:
            best = max(lines, key=lambda p: (p.get("val_accuracy", p.get("best_val_accuracy", -1.0)),
                                             -PICKED_LINES.index(p["method"])))
            picks.append({"labels_per_class": budget, "n_train": best.get("n_train"), "capped": best.get("capped"),
                          "method": PICK_METHOD, "picked": best["method"], "test_accuracy": best["test_accuracy"],
                          "val_accuracy": best.get("val_accuracy", best.get("best_val_accuracy"))})
    return picks


def capped_budgets(labels: np.ndarray, class_names: list[str], budgets) -> dict[str, dict[str, int]]:
    """The budgets (labels per class) that a class of the train split cannot fill, with each such class's item
    count: ``{"50": {"sandal": 37}}`` from train labels (N,) int. A capped point trains on all of that class's items,
    so its x is not what it says: the curve records it (``capped_budgets``, and ``capped`` on each point)."""
    capped = {}
    for budget in budgets:
        short = budget_shortfall(labels, int(budget))
        if short:
            capped[str(budget)] = {class_names[c]: n for c, n in sorted(short.items())}
    return capped


def run_curve(store: str | Path | FeatureStore, data: str | Path, out: str | Path,
              options: CurveOptions = CURVE_DEFAULTS, progress: bool = False) -> dict:
    """Train ``options.methods`` (default: the modality's ``DEFAULT_CURVE_METHODS``: all but the from-scratch
    network) at every one of ``options.budgets``; write ``out``/curve.json, curve.csv and the PNGs; return the
    result. ``options.weights``: the local checkpoint the store was extracted with (a ``tv:`` or ``timm:``
    backbone's), where image fine-tuning starts.

    ``store`` holds the cached features of the items in ``data`` (train, val and test splits). Like evaluation,
    the curve refuses a test split that shares items with train or val (:class:`LeakError`) unless
    ``options.allow_overlap``.
    """
    from .baselines import pixel_logreg, tfidf_logreg, train_from_scratch, train_text_from_scratch
    from .finetune import finetune
    from .setfit import setfit_text
    from .small_cnn import small_cnn_point
    from .text_finetune import finetune_text

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    text = store.fingerprint.get("kind") == "text"
    allowed = (*(TEXT_CURVE_METHODS if text else CURVE_METHODS), KNN_METHOD)
    methods = tuple(options.methods or DEFAULT_CURVE_METHODS["text" if text else "image"])
    if set(methods) - set(allowed):
        raise FeaturestoreError(f"methods {sorted(set(methods) - set(allowed))} do not apply to this store's "
                                f"{'texts' if text else 'images'}; choose from {', '.join(allowed)}")
    layers = None
    if MULTILAYER_METHOD in methods:
        if options.layers is None:
            raise FeaturestoreError("the multilayer line needs the store's layer store (extract --layers all): pass "
                                    "--layers (curve.layers), or leave multilayer out of the methods")
        layers = FeatureStore(options.layers)
    if not options.allow_overlap:
        check_no_overlap(store, "test")
    source = store_source(store, data)
    seed, device = options.finetune.seed, options.device
    evaluation = {split: records_for(source, split_rows(store, split), store) for split in ("val", "test")}
    capped = capped_budgets(store.labels("train"), store.class_names, options.budgets)
    work = Path(tempfile.mkdtemp(prefix=".curve-", dir=out))
    points, cache_seconds = [], 0.0
    try:
        for budget in options.budgets:
            probe, C, probe_test, probe_seconds, rows = fit_probe(store, budget, seed, options.probe)
            train = split_rows(store, "train", rows)
            base = {"labels_per_class": budget, "n_train": int(len(rows)), "capped": str(budget) in capped}
            # Every method of a budget trains on the probe's rows (by content id), not on a folder listing.
            chosen = {"train": records_for(source, train, store), **evaluation}
            for name, baseline in (("pixels", pixel_logreg), ("tfidf", tfidf_logreg)):
                if name in methods:
                    linear = baseline(source, budget, seed, chosen=chosen)
                    points.append({**base, "method": name, "test_accuracy": linear.test_accuracy,
                                   "val_accuracy": linear.val_accuracy, "seconds": linear.seconds, "C": linear.C})
            probe_ids = ids_digest(train.ids)
            if "linear_probe" in methods:
                points.append({**base, "method": "linear_probe", "test_accuracy": probe_test,
                               "val_accuracy": float(probe.score(*store.load("val", dtype=np.float32)[:2])),
                               "seconds": round(probe_seconds, 2), "C": C, "train_ids": probe_ids})
            if KNN_METHOD in methods:
                points.append({**base, "method": KNN_METHOD, **knn_point(store, rows), "train_ids": probe_ids})
            if MULTILAYER_METHOD in methods:
                points.append({**base, "method": MULTILAYER_METHOD, **multilayer_point(store, layers, rows),
                               "train_ids": probe_ids})
            if "probe_finetune" in methods:
                head = TrainedHead.fitted_on(store, probe, options.probe, C, n_train=base["n_train"])
                # The fine-tune's starting probe, on the same rows at the same C, as `finetune` builds its own.
                start = train_only_probe(head, rows, options.finetune.probe_scale_floor)
                shared = {"device": device, "progress": progress, "checkpoint_dir": work / f"ft_{budget}",
                          "train_per_class": budget, "probe": start}
                result = (finetune_text(head, data, work / f"ft_{budget}.pth", options.finetune, **shared) if text
                          else finetune(head, data, work / f"ft_{budget}.pth", options.finetune,
                                        cache=work / "trunk.h5", weights=options.weights, **shared))
                # The image trunk cache serves every budget (reported apart); a text run's lower-layer pass is
                # its own. ``result.seconds`` is the training loop alone.
                own = result.cache_seconds if text else 0.0
                cache_seconds += 0.0 if text else result.cache_seconds
                points.append({**base, "method": "probe_finetune", "test_accuracy": result.test_accuracy,
                               "seconds": round(probe_seconds + own + result.seconds, 2),
                               "epochs": result.epochs_run, "val_probe": result.start_val_accuracy,
                               "best_val_accuracy": result.best_val_accuracy,
                               "train_ids": ids_digest(result.train_ids)})
            if "setfit" in methods:
                head = TrainedHead.fitted_on(store, probe, options.probe, C, n_train=base["n_train"])
                tuned = setfit_text(head, data, work / f"setfit_{budget}.pth", options.setfit, device=device,
                                    progress=progress, train_per_class=budget, probe=probe, subset_seed=seed)
                points.append({**base, "method": "setfit", "test_accuracy": tuned.test_accuracy,
                               "val_accuracy": tuned.best_val_accuracy, "val_probe": tuned.start_val_accuracy,
                               "seconds": round(probe_seconds + tuned.cache_seconds + tuned.seconds, 2),
                               "epochs": tuned.epochs_run, "best_epoch": tuned.best_epoch, "C": tuned.C,
                               "separation": [round(tuned.start_separation, 4)]
                               + [round(h["separation"], 4) for h in tuned.history],
                               "train_ids": ids_digest(tuned.train_ids)})
            if "scratch" in methods:
                trainer = train_text_from_scratch if text else train_from_scratch
                scratch = trainer(source, options.scratch, store.fingerprint["backbone"].removesuffix("_ft"), device,
                                  progress=progress, chosen=chosen)
                points.append({**base, "method": "scratch", "test_accuracy": scratch.test_accuracy,
                               "seconds": scratch.seconds, "steps": scratch.steps,
                               "best_val_accuracy": scratch.best_val_accuracy, "converged": scratch.converged})
            if "small_cnn" in methods:
                points.append({**base, **small_cnn_point(source, options.small_cnn, device, progress, chosen)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # budgets as given (a list): a merge compares them with an earlier curve.json's
    result = {"backbone": store.fingerprint["backbone"], "budgets": list(options.budgets), "points": points,
              "picks": transfer_picks(points),
              "capped_budgets": capped, "trunk_cache_seconds": round(cache_seconds, 2), **options.recorded()}
    write_curve(result, out)
    return result


CSV_COLUMNS = ("method", "labels_per_class", "test_accuracy")


def write_curve(result: dict, out: Path) -> None:
    """``out``/curve.json, curve.csv (method, labels_per_class, test_accuracy, seconds) and the two PNGs. Timings
    routed: curve.json without its seconds, curve.csv without its seconds column and curve_seconds.png, each of
    those whole in the timings folder (``utils.timings``)."""
    points = result["points"]
    write_json(out / "curve.json", result)
    write_text_routed(out / "curve.csv", _csv_text(points, CSV_COLUMNS), _csv_text(points, CSV_COLUMNS + ("seconds",)))
    plot_curves(points + result.get("picks", []), out)


def _csv_text(points: list[dict], columns: tuple[str, ...]) -> str:
    """The points' ``columns`` as CSV (a header row, then one row per point; a point without a column leaves it
    empty)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: p.get(k) for k in columns} for p in points)
    return buffer.getvalue()


def merge_curves(earlier: dict, added: dict) -> dict:
    """``earlier``'s curve with ``added``'s methods run again or added (say, a from-scratch line trained on a
    GPU beside a curve run on a CPU). The two must share the backbone, the budgets, the probe's settings and
    the seed that draws each budget's subset; ``added``'s points replace ``earlier``'s for the methods it has,
    and the fine-tuning and from-scratch settings recorded are those of the run that made their points."""
    for key in ("backbone", "budgets", "probe"):
        if earlier[key] != added[key]:
            raise FeaturestoreError(f"cannot merge curves with different {key}: {earlier[key]} vs {added[key]}")
    if earlier["finetune"]["seed"] != added["finetune"]["seed"]:
        raise FeaturestoreError("cannot merge curves whose budgets are drawn with different seeds")
    methods = {p["method"] for p in added["points"]}
    order = {m: i for i, m in enumerate(POINT_ORDER)}
    points = sorted([p for p in earlier["points"] if p["method"] not in methods] + added["points"],
                    key=lambda p: (p["labels_per_class"], order[p["method"]]))
    finetuned = "probe_finetune" in methods
    return {**earlier, "points": points, "picks": transfer_picks(points),
            "finetune": (added if finetuned else earlier)["finetune"],
            "trunk_cache_seconds": (added if finetuned else earlier).get("trunk_cache_seconds", 0.0),
            "capped_budgets": added.get("capped_budgets", earlier.get("capped_budgets", {})),
            "scratch": (added if "scratch" in methods else earlier)["scratch"],
            **({"small_cnn": added["small_cnn"]} if "small_cnn" in methods else {}),
            **({"setfit": added["setfit"]} if "setfit" in methods else {})}


STYLES = {"scratch": ("o", "-"), "small_cnn": ("D", "-."), "pixels": ("x", ":"), "tfidf": ("x", ":"),
          "linear_probe": ("s", "-"), KNN_METHOD: ("P", "-."), MULTILAYER_METHOD: ("*", "-"),
          "probe_finetune": ("^", "--"), "setfit": ("v", "--"), PICK_METHOD: ("o", ":")}


def plot_curves(points: list[dict], out: Path) -> None:
    """curve_labels.png (test accuracy vs labels per class) and curve_seconds.png (vs training seconds; in the
    timings folder when timings are routed, and only of the points that have seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    seconds_figure = timings_path(out / "curve_seconds.png")
    if seconds_figure is not None:  # an earlier run's, beside the outputs: it would pass for one
        (out / "curve_seconds.png").unlink(missing_ok=True)
        seconds_figure.parent.mkdir(parents=True, exist_ok=True)
    for x_key, path, label in (("labels_per_class", out / "curve_labels.png", "labels per class"),
                               ("seconds", seconds_figure or out / "curve_seconds.png", "training wall-clock (s)")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for method in METHODS:  # distinct markers and dashes: curves can coincide
            series = sorted((p[x_key], p["test_accuracy"]) for p in points if p["method"] == method and x_key in p)
            if series:
                marker, line = STYLES[method]
                ax.plot(*zip(*series, strict=True), marker=marker, linestyle=line, label=method.replace("_", " "))
        ax.set_xscale("log")
        if x_key == "labels_per_class":  # the budgets themselves, not 2×10^0, 3×10^0, …
            budgets = sorted({p[x_key] for p in points})
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def accuracy_table(points: list[dict], picks: list[dict] = ()) -> str:
    """Markdown: one row per budget, one column per method: test accuracy (seconds); with ``picks`` (curve.json's)
    a last column, the transfer line best on val (its name)."""
    points = list(points) + list(picks)
    budgets = sorted({p["labels_per_class"] for p in points})
    methods = [m for m in METHODS if any(p["method"] == m for p in points)]
    lines = ["| labels/class | " + " | ".join(m.replace("_", " ") for m in methods) + " |",
             "| --- |" + " --- |" * len(methods)]
    for b in budgets:
        cells = []
        for m in methods:
            p = next((p for p in points if p["labels_per_class"] == b and p["method"] == m), None)
            spent = f" ({p['seconds']:.0f} s)" if p is not None and "seconds" in p else ""
            spent = f" ({p['picked'].replace('_', ' ')})" if p is not None and "picked" in p else spent
            cells.append("–" if p is None else f"{p['test_accuracy']:.4f}{spent}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
