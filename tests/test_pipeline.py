"""The real DVC pipeline on a tiny configuration, in a throwaway copy of the project."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from featurestore import FeatureStore
from featurestore.heads import load_head

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path) -> Path:
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pipelines", "featurestore", ".dvc"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy(source, copy / name)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["prepare"].update(labels_per_class=2, val_per_class=1, test_per_class=1)
    params["extract"].update(image_size=32, batch_size=16)
    params["train_head"]["heads"] = ["logreg", "svm_rbf"]
    params["train_head"]["sweep"].update(c_points=6, c_min=1e-3, c_max=1e2, n_jobs=1)
    params["plateau"]["budgets"] = [1, 2]
    params["finetune"].update(mode="always", epochs=1, batch_size=8, workers=0)
    params["curve"].update(budgets=[1, 2], epochs=1, batch_size=8, workers=0)
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    return copy


def dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_dvc_repro_builds_everything_then_does_nothing_and_head_params_rerun_only_heads(project):
    first = dvc(project, "repro")
    for stage in ("prepare", "extract@efficientnet_lite0", "train_head@efficientnet_lite0-logreg",
                  "train_head@efficientnet_lite0-svm_rbf", "evaluate_head@efficientnet_lite0-svm_rbf",
                  "plateau@efficientnet_lite0", "finetune@efficientnet_lite0", "curve@efficientnet_lite0", "evaluate",
                  "export@efficientnet_lite0-logreg", "predict@efficientnet_lite0-svm_rbf"):
        assert f"Running stage '{stage}'" in first
    store_path = project / "data" / "features" / "efficientnet_lite0.h5"
    store = FeatureStore(store_path)
    assert {split: len(store.paths(split)) for split in store.splits} == {"train": 20, "val": 10, "test": 10}
    assert store.fingerprint["preprocessing"]["image_size"] == 32
    mtime = store_path.stat().st_mtime_ns

    second = dvc(project, "repro")
    assert "Running stage" not in second and "up to date" in second
    assert store_path.stat().st_mtime_ns == mtime

    metrics = json.loads((project / "data" / "reports" / "metrics.json").read_text())
    decision = json.loads((project / "data" / "finetune" / "efficientnet_lite0" / "decision.json").read_text())
    assert decision["finetuned"] and decision["reason"] == "mode is always"
    assert set(metrics) == {"efficientnet_lite0__logreg", "efficientnet_lite0__svm_rbf",
                            "efficientnet_lite0_ft__logreg", "efficientnet_lite0_ft__svm_rbf"}  # frozen vs fine-tuned
    curve = json.loads((project / "data" / "reports" / "curve" / "efficientnet_lite0" / "curve.json").read_text())
    assert {p["method"] for p in curve["points"]} == {"scratch", "linear_probe", "probe_finetune"}
    ft_store = FeatureStore(project / "data" / "finetune" / "efficientnet_lite0" / "features.h5")
    assert ft_store.fingerprint["backbone"] == "efficientnet_lite0_ft"
    assert ft_store.fingerprint["weights_sha256"] != store.fingerprint["weights_sha256"]
    for name, m in metrics.items():
        if "_ft__" in name:
            continue  # the ONNX model's predictions agree with the evaluated head
        predicted = json.loads((project / "data" / "predictions" / f"{name}.json").read_text())
        assert predicted["predicted"] == m["n"] and predicted["accuracy"] == pytest.approx(m["top1"])
    assert (project / "data" / "reports" / "figures" / "efficientnet_lite0__logreg_confusion.png").is_file()
    # metrics and reports name files relative to the project: `dvc metrics diff` between clones is not noise
    for report in (project / "data").rglob("*.json"):
        if "finetune" not in report.parts:
            assert str(project) not in report.read_text() and str(ROOT) not in report.read_text(), report
    assert json.loads((project / "data" / "plateau" / "efficientnet_lite0.json").read_text())["store"] == \
        "data/features/efficientnet_lite0.h5"

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_head"]["logreg"]["normalize"] = "l2"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    heads_only = dvc(project, "repro")
    ran = set(re.findall(r"Running stage '([^']+)'", heads_only))
    # the edited head, its evaluation, export and predictions, the summary, and the fine-tune decision
    # (which starts from the logreg probe); not the cache, the other head, the plateau check or the curves
    assert ran == {"train_head@efficientnet_lite0-logreg", "evaluate_head@efficientnet_lite0-logreg",
                   "finetune@efficientnet_lite0", "evaluate", "export@efficientnet_lite0-logreg",
                   "predict@efficientnet_lite0-logreg"}
    assert store_path.stat().st_mtime_ns == mtime  # no image was decoded, the cache was not touched
    assert load_head(project / "data" / "heads" / "efficientnet_lite0__logreg.skops").config.normalize == "l2"

    params["extract"]["dtype"] = "float16"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(project, "repro")
    assert "Running stage 'prepare'" not in third and "Running stage 'extract@efficientnet_lite0'" in third
    assert "Running stage 'evaluate'" in third  # a new cache means new heads and a new report
    assert FeatureStore(store_path).dtype == "float16"
