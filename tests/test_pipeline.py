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
    for name in ("dvc.yaml", "params.yaml", "pipelines", "featurestore", "configs", ".dvc"):
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
    for backbone in ("efficientnet_lite0", "minilm_l6"):
        params["plateau"][backbone]["budgets"] = [1, 2]
        params["finetune"][backbone].update(mode="always", unfreeze_blocks=1, epochs=1, batch_size=8, workers=0)
        params["curve"][backbone].update(budgets=[1, 2])
    params["finetune"]["minilm_l6"]["mode"] = "never"  # text fine-tuning and SetFit: tests/test_text*.py, test_setfit
    params["finetune"]["efficientnet_lite0"]["views"] = 1
    params["curve"]["minilm_l6"]["methods"] = ["tfidf", "linear_probe"]
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    return copy


STORES = ("fashion_mnist", "bbc_news")  # params.yaml: Fashion-MNIST on efficientnet_lite0, BBC News on minilm_l6


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
    for name in STORES:
        for stage in ("extract", "extract_layers", "audit", "train_multilayer", "plateau", "finetune", "curve",
                      "baseline", "hybrid", "small_cnn", "verdict", "export", "predict"):
            assert f"{stage}@{name}" in stages
        assert {f"train_head@{name}-logreg", f"train_head@{name}-linear_svm",
                f"train_head_ft@{name}-linear_svm"} <= stages
        # each head's stage wrote its report on the evaluation split
        assert (project / "data" / "reports" / "heads" / f"{name}__linear_svm.json").is_file()
        audit = json.loads((project / "data" / "reports" / "audit" / f"{name}.json").read_text())
        assert audit["label_issues"]["ranked"] == sum(audit["rows"].values())
        assert (project / "data" / "reports" / "audit" / name / "suggested_corrections.csv").is_file()
    assert {"prepare", "prepare_text", "evaluate"} <= stages
    stores = {name: project / "data" / "features" / f"{name}.h5" for name in STORES}
    images, texts = FeatureStore(stores["fashion_mnist"]), FeatureStore(stores["bbc_news"])
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
    dvc(project, "repro", "-f", "-s", "train_head@bbc_news-logreg")
    assert (project / "dvc.lock").read_bytes() == lock
    timings = json.loads((project / "timings" / "data" / "heads" / "bbc_news" / "logreg.skops.json").read_text())
    assert timings["train_seconds"] > 0 and all(point["seconds"] >= 0 for point in timings["sweep"])

    metrics = json.loads((project / "data" / "reports" / "metrics.json").read_text())
    assert {"fashion_mnist__logreg", "fashion_mnist__linear_svm", "bbc_news__logreg",
            "bbc_news__linear_svm"} <= set(metrics)
    # what each extraction did goes beside no output (it depends on what was there before): a queued experiment's
    # workspace, which DVC checks out from its cache, finds the stage unchanged
    assert json.loads((project / "timings" / "data" / "features" / "fashion_mnist.h5.summary.json").read_text())[
        "extracted"] == 40
    for name in STORES:
        decision = json.loads((project / "data" / "finetune" / name / "decision.json").read_text())
        if name == "bbc_news":
            assert not decision["finetuned"] and decision["chosen"] == "probe"
        else:
            assert decision["finetuned"] and decision["reason"] == "mode is always"
            assert decision["chosen"] == decision["choice"]["chosen"] and "gain" in decision["choice"]
        verdict = json.loads((project / "data" / "verdict" / name / "verdict.json").read_text())
        incumbent = f"{name}_ft__logreg" if decision["chosen"] == "finetuned" else f"{name}__logreg"
        assert verdict["deployed"]["incumbent"] == incumbent
        # the default deploy section fits the baseline for both, and the hybrid head for texts only
        kinds = {candidate["kind"] for candidate in verdict["candidates"].values()}
        assert kinds == ({"encoder", "baseline", "hybrid"} if name == "bbc_news" else {"encoder", "baseline"})
        deployed = verdict["deployed"]["name"]
        assert deployed in metrics  # the deployed model is evaluated, and its exported model is that very model
        report = json.loads((project / "data" / "export" / f"{name}.onnx.report.json").read_text())
        assert report["name"] == deployed
        predicted = json.loads((project / "data" / "predictions" / f"{name}.json").read_text())
        assert predicted["predicted"] == metrics[deployed]["n"]
        assert predicted["accuracy"] == pytest.approx(metrics[deployed]["top1"])
    curve = json.loads((project / "data" / "reports" / "curve" / "bbc_news" / "curve.json").read_text())
    assert {p["method"] for p in curve["points"]} == {"tfidf", "linear_probe"}
    image_curve = json.loads((project / "data" / "reports" / "curve" / "fashion_mnist" / "curve.json").read_text())
    assert {p["method"] for p in image_curve["points"]} == {"pixels", "linear_probe", "knn", "multilayer",
                                                           "probe_finetune"}
    assert [p["labels_per_class"] for p in image_curve["picks"]] == [1, 2]
    # the image store keeps its layers (stores.fashion_mnist.layers: all), the text store none: a status says so
    assert sorted(p.name for p in (project / "data" / "layers" / "fashion_mnist").iterdir()) == [
        "features.h5", "status.json"]
    assert [p.name for p in (project / "data" / "layers" / "bbc_news").iterdir()] == ["status.json"]
    assert not (project / "data" / "multilayer" / "bbc_news" / "multilayer.skops").exists()
    image_verdict = json.loads((project / "data" / "verdict" / "fashion_mnist" / "verdict.json").read_text())
    assert image_verdict["candidates"]["fashion_mnist__multilayer"]["kind"] == "encoder"
    plateau = json.loads((project / "data" / "plateau" / "fashion_mnist.json").read_text())
    assert set(plateau["curves"]) == {"linear_probe", "multilayer"} and plateau["line"] in plateau["curves"]
    assert (project / "data" / "reports" / "figures" / "bbc_news__logreg_confusion.png").is_file()
    # metrics and reports name files relative to the project: `dvc metrics diff` between clones is not noise
    for report in (project / "data").rglob("*.json"):
        if "finetune" not in report.parts:
            assert str(project) not in report.read_text() and str(ROOT) not in report.read_text(), report
    assert json.loads((project / "data" / "plateau" / "fashion_mnist.json").read_text())["store"] == \
        "data/features/fashion_mnist.h5"

    records = {name: (project / "data" / "verdict" / name / "deployed.json").read_text() for name in STORES}
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_head"]["linear_svm"]["max_iter"] = 400
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    heads_only = dvc(project, "repro")
    ran = set(re.findall(r"Running stage '([^']+)'", heads_only))
    # exactly the edited head's stages on both stores (cache-only and fine-tuned), the verdicts, the summary, and an
    # export (and its predictions) only where the model the verdict deploys changed: no fine-tune, baseline,
    # hybrid, plateau, curve or extraction, and not the other head
    expected = {"evaluate"}
    for name in STORES:
        expected |= {f"train_head@{name}-linear_svm", f"train_head_ft@{name}-linear_svm", f"verdict@{name}"}
        if (project / "data" / "verdict" / name / "deployed.json").read_text() != records[name]:
            expected |= {f"export@{name}", f"predict@{name}"}
    assert ran == expected
    assert {b: path.stat().st_mtime_ns for b, path in stores.items()} == mtimes  # no item decoded, caches intact
    assert load_head(project / "data" / "heads" / "bbc_news" / "linear_svm.skops").config.max_iter == 400

    params["extract"]["efficientnet_lite0"]["dtype"] = "float16"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = next(line for line in dvc(project, "status", "--json").splitlines() if line.startswith("{"))
    changed = set(json.loads(status))  # what the next repro would run first
    assert "extract@fashion_mnist" in changed
    assert not any(stage in changed for stage in ("prepare", "prepare_text", "extract@bbc_news",
                                                  "train_head@bbc_news-logreg"))  # the other store is untouched

    # acting on an audit: a store's corrections file, applied by its extract stage, nothing re-encoded
    texts_before = FeatureStore(stores["bbc_news"])
    dropped = str(texts_before.paths("train")[0])
    (project / "configs" / "corrections" / "bbc_news.csv").write_text(f"path,label\n{dropped},\n")
    dvc(project, "repro", "-s", "extract@bbc_news")
    texts = FeatureStore(stores["bbc_news"])
    assert dropped not in texts.paths("train") and texts.count("train") == texts_before.count("train") - 1
    assert texts.source_record["corrections"]["dropped"] == 1
    summary = json.loads((project / "timings" / "data" / "features" / "bbc_news.h5.summary.json").read_text())
    assert summary["extracted"] == 0 and summary["reused"] == texts.count("train") + texts.count("val") + \
        texts.count("test")


def test_a_second_data_set_is_one_stores_entry(project):
    """A user's own data as one more entry of `stores`, beside the default ones and touching none of their stages:
    one on a backbone with settings already (its own image size, overriding the backbone's), and one on a user's own
    torchvision backbone, whose extract section points at the local checkpoint (torchvision's MobileNetV2 file,
    copied into the project). Extraction, the fine-tune stage (from that checkpoint), the curve's probe_finetune and
    the export of its cache-only head all take the file; nothing is downloaded."""
    from featurestore.encode.backbones.torchvision_models import packaged_checkpoint
    from featurestore.encode.backbones.weights import file_sha256

    backbone = "tv:mobilenet_v2"
    (project / "models").mkdir()
    shutil.copy(packaged_checkpoint("mobilenet_v2"), project / "models" / "mobilenet_v2.pth")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["stores"]["small_images"] = {"data": "prepared", "backbone": "efficientnet_lite0",
                                        "extract": {"image_size": 24}}
    params["stores"]["own_images"] = {"data": "prepared", "backbone": backbone}
    params["extract"][backbone] = {**params["extract"]["efficientnet_lite0"], "weights": "models/mobilenet_v2.pth"}
    for section in ("plateau", "finetune", "curve"):
        params[section][backbone] = dict(params[section]["efficientnet_lite0"])
    params["curve"][backbone]["methods"] = ["linear_probe", "probe_finetune"]
    params["deploy"]["baseline"] = False  # the encoder's head is the one exported (a baseline may win on 20 images)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = dvc(project, "repro", "train_head@small_images-logreg", "finetune@own_images", "curve@own_images",
              "export@own_images")
    ran = set(re.findall(r"Running stage '([^']+)'", log))
    assert {"extract@small_images", "train_head@small_images-logreg", "extract@own_images", "finetune@own_images",
            "curve@own_images", "export@own_images"} <= ran
    assert not any(name in stage for name in STORES for stage in ran) and "prepare_text" not in ran
    small = FeatureStore(project / "data" / "features" / "small_images.h5")
    assert small.fingerprint["backbone"] == "efficientnet_lite0"
    assert small.fingerprint["preprocessing"]["image_size"] == 24  # the store's own setting over its backbone's 32
    assert json.loads((project / "data" / "reports" / "heads" / "small_images__logreg.json").read_text())["n"] == 10
    store = FeatureStore(project / "data" / "features" / "own_images.h5")
    assert store.fingerprint["backbone"] == backbone
    assert store.fingerprint["weights_sha256"] == file_sha256(project / "models" / "mobilenet_v2.pth")
    decision = json.loads((project / "data" / "finetune" / "own_images" / "decision.json").read_text())
    assert decision["finetuned"] and decision["result"]["epochs_run"] == 1
    assert (project / "data" / "finetune" / "own_images" / "weights.pth").is_file() or decision["chosen"] == "probe"
    curve = json.loads((project / "data" / "reports" / "curve" / "own_images" / "curve.json").read_text())
    assert {p["method"] for p in curve["points"]} == {"linear_probe", "probe_finetune"}
    report = json.loads((project / "data" / "export" / "own_images.onnx.report.json").read_text())
    verdict = json.loads((project / "data" / "verdict" / "own_images" / "verdict.json").read_text())
    assert report["check"]["labels_equal"] and report["name"] == verdict["deployed"]["name"]
    assert report["name"].startswith("own_images")
