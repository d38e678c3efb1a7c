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
from featurestore.heads.head import load_head

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
    params["prepare_text"].update(labels_per_class=2, val_per_class=2, test_per_class=1)
    params["extract"]["efficientnet_lite0"].update(image_size=32, batch_size=16)
    params["extract"]["minilm_l6"].update(max_length=32, long_documents="chunk-mean", stride=8, max_windows=2)
    params["train_head"]["heads"] = ["logreg", "linear_svm"]
    params["train_head"]["sweep"].update(c_points=6, c_min=1e-3, c_max=1e2, n_jobs=1)
    for backbone in params["stores"]:
        params["plateau"][backbone]["budgets"] = [1, 2]
        params["finetune"][backbone].update(mode="always", unfreeze_blocks=1, epochs=1, batch_size=8, workers=0)
        params["curve"][backbone].update(budgets=[1, 2])
    params["finetune"]["minilm_l6"]["mode"] = "never"  # text fine-tuning and SetFit: tests/test_text*.py, test_setfit
    params["finetune"]["efficientnet_lite0"]["views"] = 1
    params["curve"]["minilm_l6"]["methods"] = ["tfidf", "linear_probe"]
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    return copy


DATA_SETS = {"efficientnet_lite0": "fashion_mnist", "minilm_l6": "bbc_news"}  # params.yaml's export entries


def dvc(project: Path, *args: str, **env_extra: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env_extra}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def undeclared_params_reads(project: Path, log: Path) -> dict[str, list[str]]:
    """Stage → the params keys its run read (pipelines/_params.py notes them) that its declared params (as dvc.lock
    records them) do not cover: a key declared, or a section of one, covers it and everything below it."""
    locked = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    by_cmd = {" ".join(body["cmd"].split()): (name, list(body.get("params", {}).get("params.yaml", {})))
              for name, body in locked.items()}
    problems = {}
    for line in log.read_text().splitlines():
        run = json.loads(line)
        name, declared = by_cmd[" ".join(run["cmd"].split())]
        missing = [key for key in run["keys"] if not any(key == d or key.startswith(d + ".") for d in declared)]
        if missing:
            problems[name] = missing
    return problems


def test_dvc_repro_builds_both_data_sets_then_does_nothing_and_head_params_rerun_only_heads(project):
    reads = project / "params_read.jsonl"
    first = dvc(project, "repro", FEATURESTORE_PARAMS_READ=str(reads))
    # every params key a stage read is one it declares: editing any other key cannot change its output
    assert len(reads.read_text().splitlines()) == len(re.findall(r"Running stage", first))
    assert undeclared_params_reads(project, reads) == {}
    stages = set(re.findall(r"Running stage '([^']+)'", first))
    for backbone in ("efficientnet_lite0", "minilm_l6"):
        for stage in ("extract", "plateau", "finetune", "curve", "baseline", "hybrid", "verdict"):
            assert f"{stage}@{backbone}" in stages
        assert {f"train_head@{backbone}-logreg", f"evaluate_head@{backbone}-linear_svm",
                f"train_head_ft@{backbone}-linear_svm", f"export@{DATA_SETS[backbone]}",
                f"predict@{DATA_SETS[backbone]}"} <= stages
    assert {"prepare", "prepare_text", "evaluate"} <= stages
    stores = {b: project / "data" / "features" / f"{b}.h5" for b in ("efficientnet_lite0", "minilm_l6")}
    images, texts = FeatureStore(stores["efficientnet_lite0"]), FeatureStore(stores["minilm_l6"])
    assert {split: len(images.paths(split)) for split in images.splits} == {"train": 20, "val": 10, "test": 10}
    assert images.fingerprint["preprocessing"]["image_size"] == 32
    assert texts.fingerprint["kind"] == "text" and texts.fingerprint["tokenization"]["long_documents"] == "chunk-mean"
    assert {split: len(texts.paths(split)) for split in texts.splits} == {"train": 10, "val": 10, "test": 5}
    mtimes = {b: path.stat().st_mtime_ns for b, path in stores.items()}

    second = dvc(project, "repro")
    assert "Running stage" not in second and "up to date" in second
    assert {b: path.stat().st_mtime_ns for b, path in stores.items()} == mtimes
    # a stage run again on the same inputs writes the same bytes (its seconds go to the git-ignored timings/)
    lock = (project / "dvc.lock").read_bytes()
    dvc(project, "repro", "-f", "-s", "train_head@minilm_l6-logreg", "evaluate_head@minilm_l6-logreg")
    assert (project / "dvc.lock").read_bytes() == lock
    timings = json.loads((project / "timings" / "data" / "heads" / "minilm_l6__logreg.skops.json").read_text())
    assert timings["train_seconds"] > 0 and all(point["seconds"] >= 0 for point in timings["sweep"])

    metrics = json.loads((project / "data" / "reports" / "metrics.json").read_text())
    assert {"efficientnet_lite0__logreg", "efficientnet_lite0__linear_svm", "minilm_l6__logreg",
            "minilm_l6__linear_svm"} <= set(metrics)
    for backbone in ("efficientnet_lite0", "minilm_l6"):
        decision = json.loads((project / "data" / "finetune" / backbone / "decision.json").read_text())
        if backbone == "minilm_l6":
            assert not decision["finetuned"] and decision["chosen"] == "probe"
        else:
            assert decision["finetuned"] and decision["reason"] == "mode is always"
            assert decision["chosen"] == decision["choice"]["chosen"] and "gain" in decision["choice"]
        verdict = json.loads((project / "data" / "verdict" / backbone / "verdict.json").read_text())
        incumbent = f"{backbone}_ft__logreg" if decision["chosen"] == "finetuned" else f"{backbone}__logreg"
        assert verdict["deployed"]["incumbent"] == incumbent
        # the default deploy section fits the baseline for both, and the hybrid head for texts only
        kinds = {candidate["kind"] for candidate in verdict["candidates"].values()}
        assert kinds == ({"encoder", "baseline", "hybrid"} if backbone == "minilm_l6" else {"encoder", "baseline"})
        deployed = verdict["deployed"]["name"]
        assert deployed in metrics  # the deployed model is evaluated, and its exported model is that very model
        report = json.loads((project / "data" / "export" / f"{DATA_SETS[backbone]}.onnx.report.json").read_text())
        assert report["name"] == deployed
        predicted = json.loads((project / "data" / "predictions" / f"{DATA_SETS[backbone]}.json").read_text())
        assert predicted["predicted"] == metrics[deployed]["n"]
        assert predicted["accuracy"] == pytest.approx(metrics[deployed]["top1"])
    curve = json.loads((project / "data" / "reports" / "curve" / "minilm_l6" / "curve.json").read_text())
    assert {p["method"] for p in curve["points"]} == {"tfidf", "linear_probe"}
    image_curve = json.loads((project / "data" / "reports" / "curve" / "efficientnet_lite0" / "curve.json").read_text())
    assert {p["method"] for p in image_curve["points"]} == {"pixels", "linear_probe", "probe_finetune"}
    assert (project / "data" / "reports" / "figures" / "minilm_l6__logreg_confusion.png").is_file()
    # metrics and reports name files relative to the project: `dvc metrics diff` between clones is not noise
    for report in (project / "data").rglob("*.json"):
        if "finetune" not in report.parts:
            assert str(project) not in report.read_text() and str(ROOT) not in report.read_text(), report
    assert json.loads((project / "data" / "plateau" / "efficientnet_lite0.json").read_text())["store"] == \
        "data/features/efficientnet_lite0.h5"

    records = {b: (project / "data" / "verdict" / b / "deployed.json").read_text() for b in DATA_SETS}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_head"]["linear_svm"]["max_iter"] = 400
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    heads_only = dvc(project, "repro")
    ran = set(re.findall(r"Running stage '([^']+)'", heads_only))
    # exactly the edited head's stages on both stores (cache-only and fine-tuned), the verdicts, the summary, and an
    # export (and its predictions) only where the model the verdict deploys changed: no fine-tune, baseline,
    # hybrid, plateau, curve or extraction, and not the other head
    expected = {"evaluate"}
    for backbone, name in DATA_SETS.items():
        expected |= {f"train_head@{backbone}-linear_svm", f"evaluate_head@{backbone}-linear_svm",
                     f"train_head_ft@{backbone}-linear_svm", f"verdict@{backbone}"}
        if (project / "data" / "verdict" / backbone / "deployed.json").read_text() != records[backbone]:
            expected |= {f"export@{name}", f"predict@{name}"}
    assert ran == expected
    assert {b: path.stat().st_mtime_ns for b, path in stores.items()} == mtimes  # no item decoded, caches intact
    assert load_head(project / "data" / "heads" / "minilm_l6__linear_svm.skops").config.max_iter == 400

    params["extract"]["efficientnet_lite0"]["dtype"] = "float16"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = next(line for line in dvc(project, "status", "--json").splitlines() if line.startswith("{"))
    changed = set(json.loads(status))  # what the next repro would run first
    assert "extract@efficientnet_lite0" in changed
    assert not any(stage in changed for stage in ("prepare", "prepare_text", "extract@minilm_l6",
                                                  "train_head@minilm_l6-logreg"))  # the other store is untouched


def test_a_tv_backbone_from_a_local_checkpoint_runs_through_the_stages(project):
    """A user's own torchvision backbone as one more store: `stores` names tv:mobilenet_v2, its extract section
    points at the local checkpoint (torchvision's MobileNetV2 file, copied into the project). Extraction, the
    fine-tune stage (from that checkpoint), the curve's probe_finetune and the export of its cache-only head all
    take the file; nothing is downloaded."""
    from featurestore.encode.backbones.torchvision_models import packaged_checkpoint
    from featurestore.encode.backbones.weights import file_sha256

    backbone = "tv:mobilenet_v2"
    (project / "models").mkdir()
    shutil.copy(packaged_checkpoint("mobilenet_v2"), project / "models" / "mobilenet_v2.pth")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["stores"] = {backbone: "prepared"}  # alone: the fine-tune stage reads every store's heads
    params["extract"][backbone] = {**params["extract"]["efficientnet_lite0"], "weights": "models/mobilenet_v2.pth"}
    for section in ("plateau", "finetune", "curve"):
        params[section][backbone] = dict(params[section]["efficientnet_lite0"])
    params["curve"][backbone]["methods"] = ["linear_probe", "probe_finetune"]
    params["export"] = {"own_images": {"backbone": backbone, "data": "prepared"}}
    params["deploy"]["baseline"] = False  # the encoder's head is the one exported (a baseline may win on 20 images)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = dvc(project, "repro", f"finetune@{backbone}", f"curve@{backbone}", "export@own_images")
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    assert {f"extract@{backbone}", f"finetune@{backbone}", f"curve@{backbone}", "export@own_images"} <= ran
    assert not any("efficientnet_lite0" in stage or "minilm_l6" in stage or stage == "prepare_text" for stage in ran)
    store = FeatureStore(project / "data" / "features" / f"{backbone}.h5")
    assert store.fingerprint["backbone"] == backbone
    assert store.fingerprint["weights_sha256"] == file_sha256(project / "models" / "mobilenet_v2.pth")
    decision = json.loads((project / "data" / "finetune" / backbone / "decision.json").read_text())
    assert decision["finetuned"] and decision["result"]["epochs_run"] == 1
    assert (project / "data" / "finetune" / backbone / "weights.pth").is_file() or decision["chosen"] == "probe"
    curve = json.loads((project / "data" / "reports" / "curve" / backbone / "curve.json").read_text())
    assert {p["method"] for p in curve["points"]} == {"linear_probe", "probe_finetune"}
    report = json.loads((project / "data" / "export" / "own_images.onnx.report.json").read_text())
    verdict = json.loads((project / "data" / "verdict" / backbone / "verdict.json").read_text())
    assert report["check"]["labels_equal"] and report["name"] == verdict["deployed"]["name"]
