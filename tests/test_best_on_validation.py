"""The verdict: the incumbent head stays deployed unless a challenger (another head, the baseline without an encoder
(TF-IDF or raw pixels + logistic regression), the hybrid head) beats it beyond the noise of the validation split, with
the figures in decision.json and comparison.md; export ships exactly the model the verdict names, through the same
path as an encoder + head. The hybrid head ([w × embedding, TF-IDF] + logistic regression) trains, saves and loads."""

import json
import random

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.configs import HeadConfig, Tokenization
from featurestore.data.prepare import bbc_news_dir
from featurestore.data.sources import scan_source
from featurestore.deploy.baseline_export import export_baseline_onnx
from featurestore.deploy.deployment import deployed_model, export_model
from featurestore.deploy.export import labels_match
from featurestore.deploy.predict import OnnxClassifier, predict, read_model_metadata
from featurestore.extract import extract_features
from featurestore.heads import train_head
from featurestore.heads.baseline import decode_pixels, evaluate_model, fit_baseline, load_baseline, read_texts
from featurestore.heads.head import load_head
from featurestore.heads.model_file import load_model
from featurestore.heads.records import store_records
from featurestore.heads.reports import deployment_table
from featurestore.transfer.best import best_on_validation, run_challenger_stage, run_verdict_stage
from featurestore.transfer.probe import records_for, split_rows

HEADS = {"logreg": HeadConfig(c_min=1e-3, c_max=1e2, c_points=6, n_jobs=1)}


# -- the rule, pure ----------------------------------------------------------------------------------------------

ENCODER = {"demo__logreg": {"val": 0.90, "n": 100}, "demo__linear_svm": {"val": 0.92, "n": 100}}


def baseline_at(val):
    return {"demo__tfidf_logreg": {"val": val, "n": 100, "kind": "baseline", "file": "baseline.skops"}}


def test_a_baseline_better_than_every_encoder_head_on_validation_is_deployed_with_both_figures():
    # a lead of 7 items of 100 beyond the noise (issue 25: a lead of one item is not; figures alone: the test runs on
    # the most favourable pairing, here p = 1/128)
    verdict = best_on_validation(ENCODER, baseline_at(0.99))
    assert verdict["model"] == "baseline" and verdict["name"] == "demo__tfidf_logreg"
    assert verdict["file"] == "baseline.skops" and verdict["val_accuracy"] == 0.99
    assert verdict["best_encoder"] == "demo__linear_svm" and verdict["best_encoder_val"] == 0.92
    assert verdict["incumbent"] == "demo__logreg" and verdict["incumbent_val"] == 0.90  # the first head listed
    assert verdict["baseline_val"] == 0.99 and "0.9900" in verdict["reason"] and "0.9000" in verdict["reason"]


@pytest.mark.parametrize("val", [0.93, 0.92, 0.91, 0.5])  # 0.93: a lead of one item of 100, within the noise
def test_a_baseline_that_ties_or_loses_leaves_the_encoder_heads_deployed(val):
    verdict = best_on_validation(ENCODER, baseline_at(val))
    assert verdict["model"] == "encoder" and verdict["file"] is None
    assert verdict["best_encoder_val"] == 0.92 and verdict["baseline_val"] == val  # both figures all the same


def test_the_hybrid_head_is_deployed_only_when_it_beats_the_encoder_and_the_baseline():
    hybrid = {"demo__hybrid": {"val": 0.99, "n": 100, "kind": "hybrid", "file": "hybrid.skops"}}
    assert best_on_validation(ENCODER, {**baseline_at(0.97), **hybrid})["name"] == "demo__hybrid"
    assert best_on_validation(ENCODER, {**baseline_at(1.0), **hybrid})["name"] == "demo__tfidf_logreg"
    assert best_on_validation(ENCODER, {"demo__hybrid": {**hybrid["demo__hybrid"], "val": 0.92}})["model"] == "encoder"


@pytest.mark.slow
def test_the_cli_fits_every_candidate_the_pipeline_weighs_and_picks_what_it_would_deploy(coded, tmp_path, capsys):
    """Where word counts win (the coded corpus), a command-line user reaches the model the pipeline deploys:
    `train-head --head baseline` and `--head hybrid` fit the challengers the pipeline's stages fit (the same
    models), `verdict` weighs them beside the head and deploys the baseline, and `export` ships it."""
    from featurestore.cli import main

    root, data, store, head = coded
    files = {kind: tmp_path / f"{kind}.skops" for kind in ("baseline", "hybrid")}
    for kind, path in files.items():
        assert main(["train-head", "--features", str(store.path), "--head", kind, "--out", str(path), "--json"]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed["kind"] == kind and printed["name"] == load_model(path).name
    staged = challengers_then_verdict(head, data, tmp_path / "stages")
    for kind, path in files.items():  # the stage's model and the command's are the same fit
        model, from_stage = load_model(path), load_model(tmp_path / "stages" / "challengers" / kind / f"{kind}.skops")
        assert (model.name, model.C, model.val_accuracy) == (from_stage.name, from_stage.C, from_stage.val_accuracy)
    assert main(["verdict", str(head), str(files["baseline"]), str(files["hybrid"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["candidates"]) == {"minilm_l6__logreg", "minilm_l6__tfidf_logreg", "minilm_l6__hybrid"}
    assert result["deployed"]["name"] == staged["deployed"]["name"] == "minilm_l6__tfidf_logreg"
    # the challengers carry their train-only answers on validation; the verdict reads them instead of refitting,
    # and a refit gives the same answers
    for path in files.values():
        model = load_model(path)
        assert len(model.val_answers) == model.n_val
        model.val_answers = {}
        model.save(path.with_name(f"refit_{path.name}"))
    refit = [str(path.with_name(f"refit_{path.name}")) for path in files.values()]
    assert main(["verdict", str(head), *refit, "--json"]) == 0
    refitted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    def figures(verdict: dict) -> dict:
        return {name: {k: v for k, v in c.items() if k not in ("file", "sha256")}
                for name, c in verdict["candidates"].items()}

    assert figures(refitted) == figures(result) and refitted["deployed"]["reason"] == result["deployed"]["reason"]
    assert main(["export", "--head", str(files["baseline"]), "--out", str(tmp_path / "model.onnx"), "--json"]) == 0
    assert read_model_metadata(tmp_path / "model.onnx")["featurestore_model"] == "minilm_l6__tfidf_logreg"
    # a hybrid head needs texts, and --data and --name are refused where they mean nothing
    assert main(["train-head", "--features", str(store.path), "--head", "logreg", "--data", str(data),
                 "--out", str(tmp_path / "x.skops")]) == 2
    assert "--data is for --head baseline or hybrid" in capsys.readouterr().err


# -- a corpus where word counts separate the classes and the encoder cannot -------------------------------------

CODES = ("qzv", "xkb", "wjf")  # the label is which code word a document carries; its topic says nothing


def coded_corpus(root, per_split=(10, 6, 4), seed=0):
    """3 classes, ``per_split`` documents per class in train/val/test: the opening words of real BBC articles
    (any topic, drawn at random), then the class's code word three times at the end, past the 64 tokens the
    encoder reads (as a label deep in a long document is). The sentence encoder sees the topic; TF-IDF the code."""
    articles = sorted(bbc_news_dir().rglob("*.txt"))
    rng = random.Random(seed)
    rng.shuffle(articles)
    texts = iter(a.read_text(encoding="latin-1").split() for a in articles)
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        for label, code in enumerate(CODES):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                words = next(texts)[:80] + [code] * 3
                (folder / f"{i}.txt").write_text(" ".join(words), encoding="utf-8")
    return root


def challengers_then_verdict(head, data, root, kinds=("baseline", "hybrid")) -> dict:
    """The pipeline's challenger stages (``root/challengers/<kind>``) and verdict stage (``root/verdict/minilm_l6``)
    over one cache-only head, with no fine-tuned backbone."""
    store = load_head(head).store_path
    for kind in kinds:
        run_challenger_stage(kind, "minilm_l6", store, root / "challengers" / kind, data, split="test")
    return run_verdict_stage([head], None, [root / "challengers" / kind for kind in kinds],
                             root / "verdict" / "minilm_l6", data)


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    data = coded_corpus(root / "data")
    store = root / "features" / "minilm_l6.h5"
    extract_features(data, store, "minilm_l6", tokenization=Tokenization(max_length=64), batch_size=16, workers=0,
                     progress=False)
    head = train_head(store, HEADS["logreg"]).save(root / "heads" / "minilm_l6__logreg.skops")
    return root, data, FeatureStore(store), head


@pytest.mark.slow
def test_the_baseline_wins_on_validation_is_named_deployed_exported_and_predicted(coded, tmp_path):
    root, data, store, head = coded
    out = tmp_path / "verdict" / "minilm_l6"
    written = challengers_then_verdict(head, data, tmp_path)
    assert json.loads((tmp_path / "challengers" / "hybrid" / "status.json").read_text())["fitted"]
    # each challenger stage evaluates its model on the evaluation split, as train_head does for a head
    for kind in ("baseline", "hybrid"):
        folder = tmp_path / "challengers" / kind
        model = load_model(folder / f"{kind}.skops")
        assert json.loads((folder / "metrics.json").read_text()) == \
            evaluate_model(model, store, store_records(store, "test", data), "test")
    assert written["candidates"]["minilm_l6__hybrid"]["kind"] == "hybrid"  # a candidate; at a tie the baseline wins
    assert written == json.loads((out / "verdict.json").read_text())
    deployed = written["deployed"]
    baseline = load_baseline(tmp_path / "challengers" / "baseline" / "baseline.skops").summary()
    encoder_val = written["candidates"]["minilm_l6__logreg"]["val"]
    assert baseline["name"] == "minilm_l6__tfidf_logreg" and baseline["val_accuracy"] == 1.0
    assert encoder_val < 0.8  # the encoder does not see the codes
    assert deployed["model"] == "baseline" and deployed["name"] == "minilm_l6__tfidf_logreg"
    assert deployed["baseline_val"] == 1.0 and deployed["best_encoder_val"] == encoder_val
    assert written["candidates"]["minilm_l6__logreg"]["n"] == baseline["n_val"] == 18  # the same val rows

    # export ships the baseline: one graph on raw strings, checked against scikit-learn
    source = deployed_model(out / "deployed.json")
    assert source == tmp_path / "challengers" / "baseline" / "baseline.skops" == deployed_model(out / "verdict.json")
    assert json.loads((out / "deployed.json").read_text()) == {
        "name": "minilm_l6__tfidf_logreg", "model": "baseline", "file": "../../challengers/baseline/baseline.skops",
        "sha256": deployed["sha256"]}
    report = export_model(source, tmp_path / "model.onnx")
    assert report["check"]["labels_equal"] and report["check"]["max_probability_diff"] < 1e-4
    meta = read_model_metadata(tmp_path / "model.onnx")
    assert meta["featurestore_model"] == "minilm_l6__tfidf_logreg" and meta["featurestore_model_kind"] == "baseline"
    assert meta["featurestore_text_input"] == "strings" and report["name"] == "minilm_l6__tfidf_logreg"
    model = load_baseline(source)
    test = records_for(scan_source(data), split_rows(store, "test"), store)
    texts = read_texts(test)
    probabilities, labels = OnnxClassifier(tmp_path / "model.onnx", "cpu")(texts)
    expected = model.predict_proba(texts)
    assert np.abs(probabilities - expected).max() < 1e-4
    # the smallest C among equals (every C scores 1.0 on val) gives near-uniform probabilities: a label may differ
    # from scikit-learn's only where its probabilities tie within the tolerance
    assert labels_match(expected, labels, 1e-4).all()

    # predict and evaluate agree on the test split, and the report names the baseline with both figures
    truth = np.array([r.label for r in test])
    metrics = evaluate_model(model, store, test)
    summary = predict(tmp_path / "model.onnx", data, tmp_path / "predictions.csv", split="test", progress=False,
                      workers=0)
    assert metrics["top1"] == pytest.approx(np.mean(expected.argmax(1) == truth))
    assert summary.accuracy == pytest.approx(np.mean(labels == truth)) and summary.predicted == len(test)
    table = deployment_table({"minilm_l6": written})
    assert "**minilm_l6__tfidf_logreg** (baseline)" in table
    assert f"minilm_l6__logreg ({encoder_val:.4f})" in table and "minilm_l6__tfidf_logreg (1.0000)" in table


@pytest.mark.slow
def test_the_encoder_that_wins_on_validation_stays_deployed(tmp_path):
    """BBC topics with 3 labelled articles each: the encoder knows topics, TF-IDF has 3 articles to learn from. The
    encoder against the baseline alone (``hybrid=False``); with the default, the hybrid head is a candidate too and
    here scores above both on validation, but by a lead within the noise of 30 items (issue 25): the encoder stays,
    and a warning names the split's size."""
    from featurestore.data.prepare import prepare_bbc_news

    data = tmp_path / "bbc"
    prepare_bbc_news(data, labels_per_class=3, val_per_class=6, test_per_class=1, seed=0)
    store = tmp_path / "features" / "minilm_l6.h5"
    extract_features(data, store, "minilm_l6", tokenization=Tokenization(max_length=64), batch_size=16, workers=0,
                     progress=False)
    head = train_head(store, HEADS["logreg"]).save(tmp_path / "heads" / "minilm_l6__logreg.skops")
    verdict = challengers_then_verdict(head, data, tmp_path / "baseline_only", kinds=("baseline",))
    deployed = verdict["deployed"]
    assert deployed["model"] == "encoder" and deployed["best_encoder_val"] > deployed["baseline_val"]
    record = tmp_path / "baseline_only" / "verdict" / "minilm_l6" / "deployed.json"
    assert deployed_model(record) == head and deployed["name"] == "minilm_l6__logreg"
    assert "**minilm_l6__logreg** (encoder)" in deployment_table({"minilm_l6": verdict})

    with_hybrid = challengers_then_verdict(head, data, tmp_path / "with_hybrid")["deployed"]
    test = with_hybrid["test"]
    assert test["candidate"] == "minilm_l6__hybrid" and test["paired"] and test["n"] == 30
    assert test["candidate_val"] > max(test["incumbent_val"], with_hybrid["baseline_val"]) and not test["beats"]
    assert with_hybrid["model"] == "encoder" and "the validation split has 30 items" in with_hybrid["warning"]


# -- raw pixels: the same export and predict path on uint8 images ------------------------------------------------

def test_the_pixel_baseline_exports_a_graph_on_uint8_images_that_predict_agrees_with(fashion_folder_master, tmp_path):
    source = scan_source(fashion_folder_master)
    split = {name: [r for r in source.records if r.split == name] for name in ("train", "val", "test")}
    model = fit_baseline("pixels", split["train"], split["val"], source.class_names, "demo")
    model.save(tmp_path / "baseline.skops")
    loaded = load_baseline(tmp_path / "baseline.skops")
    images = decode_pixels(split["test"])
    assert images.shape == (10, 3, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(loaded.predict_proba(images), model.predict_proba(images))
    report = export_model(tmp_path / "baseline.skops", tmp_path / "pixels.onnx")
    assert report["check"]["labels_equal"] and report["check"]["max_probability_diff"] < 1e-4
    assert report["modality"] == "image" and "Floor" in report["operators"]
    probabilities, labels = OnnxClassifier(tmp_path / "pixels.onnx", "cpu")(images)
    assert np.abs(probabilities - model.predict_proba(images)).max() < 1e-4
    summary = predict(tmp_path / "pixels.onnx", fashion_folder_master, tmp_path / "p.csv", split="test",
                      progress=False, workers=0)
    assert summary.accuracy == pytest.approx(float(np.mean(model.predict(images) == [r.label for r in split["test"]])))
    colour = np.random.default_rng(0).integers(0, 256, (4, 3, 28, 28), dtype=np.uint8)  # PIL's grey, exactly
    assert export_baseline_onnx(model, tmp_path / "colour.onnx", colour)["check"]["max_probability_diff"] < 1e-4


def test_a_baseline_file_refuses_the_encoder_export_options(fashion_folder_master, tmp_path):
    from featurestore.errors import ExportError

    source = scan_source(fashion_folder_master)
    split = {name: [r for r in source.records if r.split == name] for name in ("train", "val")}
    fit_baseline("pixels", split["train"], split["val"], source.class_names, "demo").save(tmp_path / "b.skops")
    with pytest.raises(ExportError, match="quantize"):
        export_model(tmp_path / "b.skops", tmp_path / "b.onnx", quantize="int8")


# -- the hybrid head ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_hybrid_head_trains_saves_and_loads(coded, tmp_path):
    from featurestore.heads.hybrid import fit_hybrid, load_hybrid

    _, data, store, _ = coded
    records = {s: records_for(scan_source(data), split_rows(store, s), store) for s in ("train", "val", "test")}
    model = fit_hybrid(store, records["train"], records["val"], "minilm_l6")
    assert model.weight in (0.5, 1.0) and model.val_accuracy == 1.0  # it sees the codes through TF-IDF
    model.save(tmp_path / "hybrid.skops")
    loaded = load_hybrid(tmp_path / "hybrid.skops")
    texts, embeddings = read_texts(records["test"]), store.load("test", dtype=np.float32)[0]
    assert np.array_equal(loaded.predict_proba(texts, embeddings), model.predict_proba(texts, embeddings))
    assert evaluate_model(loaded, store, records["test"])["top1"] == 1.0
    with pytest.raises(ValueError, match="embeddings"):
        loaded.predict_proba(texts, embeddings[:, :10])


@pytest.mark.slow
def test_the_hybrid_head_exports_one_graph_on_strings_and_tokens_that_agrees_with_python(coded, tmp_path):
    from featurestore.heads.hybrid import fit_hybrid, load_hybrid

    _, data, store, _ = coded
    records = {s: records_for(scan_source(data), split_rows(store, s), store) for s in ("train", "val", "test")}
    fit_hybrid(store, records["train"], records["val"], "minilm_l6").save(tmp_path / "hybrid.skops")
    report = export_model(tmp_path / "hybrid.skops", tmp_path / "hybrid.onnx")
    assert report["check"]["labels_equal"] and report["check"]["max_probability_diff"] < 1e-4
    assert {"Tokenizer", "Concat", "Gemm"} <= set(report["operators"])
    meta = read_model_metadata(tmp_path / "hybrid.onnx")
    assert meta["featurestore_model"] == "minilm_l6__hybrid" and meta["featurestore_text_input"] == "strings+tokens"
    summary = predict(tmp_path / "hybrid.onnx", data, tmp_path / "hybrid.csv", split="test", progress=False,
                      workers=0)
    model = load_hybrid(tmp_path / "hybrid.skops")
    assert summary.predicted == len(records["test"])
    assert summary.accuracy == pytest.approx(evaluate_model(model, store, records["test"])["top1"])
