"""One model file for every deployable model (issues 25 and 26): one skops layout and trust list for heads, baselines
and the hybrid head, torch state dicts kept bit-exactly, byte-reproducible writes, and the old layouts still read."""

import json
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from featurestore.configs import HeadConfig
from featurestore.errors import HeadFileError
from featurestore.heads.baseline import BaselineModel, load_baseline, make_tfidf, model_format
from featurestore.heads.estimators import build_estimator
from featurestore.heads.head import TrainedHead, load_head
from featurestore.heads.hybrid import HybridModel, hybrid_rows, load_hybrid
from featurestore.heads.model_file import (
    ModelDocument,
    load_model,
    model_kind,
    register_kind,
    save_model,
    state_dict_to_tensors,
    tensors_to_state_dict,
)

TEXTS = ["stocks fell sharply", "the market rallied", "shares and bonds", "the striker scored twice",
         "a late goal won it", "the keeper saved a penalty"]
LABELS = np.array([0, 0, 0, 1, 1, 1])


def _features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 8)).astype(np.float32), np.arange(40) % 3


def make_head(head: str = "linear_svm") -> TrainedHead:
    """A real head (a calibrated linear SVM behind featurestore's scaler) on random features."""
    X, y = _features()
    config = HeadConfig(head=head)
    return TrainedHead(estimator=build_estimator(config, 0.5).fit(X, y), config=config, C=0.5,
                       class_names=["a", "b", "c"], feature_dim=8, fingerprint_hash="f" * 16,
                       fingerprint={"backbone": "demo", "dtype": "float32"}, store_path="demo.h5",
                       sweep=[{"C": 0.5, "val_accuracy": 0.75}], train_seconds=1.25, n_train=40)


def make_baseline() -> BaselineModel:
    estimator = Pipeline([("tfidf", make_tfidf().fit(TEXTS)), ("classify", LogisticRegression())])
    estimator.fit(TEXTS, LABELS)
    return BaselineModel(kind="tfidf", estimator=estimator, C=1.0, class_names=["business", "sport"],
                         backbone="minilm_l6", val_accuracy=0.5, n_val=2, n_train=6, store_fingerprint_hash="h",
                         store_path="s.h5", sweep=[{"C": 1.0, "val_accuracy": 0.5}], train_seconds=0.5)


def make_hybrid() -> HybridModel:
    embeddings = np.random.default_rng(1).normal(size=(len(TEXTS), 4)).astype(np.float32)
    tfidf = make_tfidf().fit(TEXTS)
    classify = LogisticRegression().fit(hybrid_rows(tfidf, TEXTS, embeddings, 0.5), LABELS)
    return HybridModel(estimator=Pipeline([("tfidf", tfidf), ("classify", classify)]), weight=0.5, C=1.0,
                       class_names=["business", "sport"], backbone="minilm_l6", feature_dim=4,
                       fingerprint={"backbone": "minilm_l6"}, fingerprint_hash="h", store_path="s.h5",
                       val_accuracy=0.5, n_val=2, n_train=6, sweep=[{"weight": 0.5, "C": 1.0, "val_accuracy": 0.5}])


def same_predictions(a, b) -> bool:
    if isinstance(a, TrainedHead):
        X = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)
        return np.array_equal(a.predict_proba(X), b.predict_proba(X))
    if isinstance(a, HybridModel):
        embeddings = np.ones((2, 4), dtype=np.float32)
        return np.array_equal(a.predict_proba(TEXTS[:2], embeddings), b.predict_proba(TEXTS[:2], embeddings))
    return np.array_equal(a.predict_proba(TEXTS), b.predict_proba(TEXTS))


def schema(path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("schema.json"))


def content(path, key):
    return json.loads(schema(path)["content"][key]["content"])


MODELS = {"head": make_head, "baseline": make_baseline, "hybrid": make_hybrid}


@pytest.mark.parametrize("kind", MODELS)
def test_every_model_is_one_layout_with_one_loader(kind, tmp_path):
    model = MODELS[kind]()
    path = save_model(model, tmp_path / f"{kind}.skops")
    assert (content(path, "format"), content(path, "version"), content(path, "kind")) == ("featurestore-model", 1,
                                                                                          kind)
    assert model_kind(path) == kind and model_format(path) == kind
    loaded = load_model(path)
    assert type(loaded) is type(model) and same_predictions(model, loaded)
    assert {k: v for k, v in vars(loaded).items() if k != "estimator"} == \
        {k: v for k, v in vars(model).items() if k != "estimator"}
    # the per-kind loaders are the same path, and refuse another kind in one line naming the file
    loader = {"head": load_head, "baseline": load_baseline, "hybrid": load_hybrid}[kind]
    assert same_predictions(model, loader(path))
    other = load_baseline if kind != "baseline" else load_head
    with pytest.raises(HeadFileError, match=rf"{path}: a {kind} model file, not a"):
        other(path)


@pytest.mark.parametrize("kind", MODELS)
def test_the_same_model_saved_twice_gives_the_same_bytes(kind, tmp_path):
    """Issue 26: skops stamps the zip entries with the time and names arrays by their id(), so a head saved again
    changed its bytes and DVC reran every stage downstream."""
    model = MODELS[kind]()
    first = model.save(tmp_path / "first.skops").read_bytes()
    second = model.save(tmp_path / "second.skops").read_bytes()
    assert first == second
    again = load_model(tmp_path / "first.skops")  # a loaded model (new objects, new ids) writes the same bytes too
    assert save_model(again, tmp_path / "third.skops").read_bytes() == first
    with zipfile.ZipFile(tmp_path / "first.skops") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_a_model_fitted_and_saved_in_two_processes_is_the_same_file(tmp_path):
    """A DVC stage reruns in a new process: the file must not carry anything of the process (scikit-learn's
    vectorizers keep an id() in ``_stop_words_id``; set order follows PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys; from tests.test_model_file import MODELS; from featurestore.heads.model_file import "
              "save_model; [save_model(MODELS[k](), f'{sys.argv[1]}/{k}.skops') for k in MODELS]")
    (tmp_path / "1").mkdir()
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "1")], check=True, timeout=120,
                   cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONHASHSEED": "1"})
    for kind in MODELS:  # this process: another id() for every object, another hash seed (random, or not 1)
        here = save_model(MODELS[kind](), tmp_path / f"{kind}.skops").read_bytes()
        assert here == (tmp_path / "1" / f"{kind}.skops").read_bytes()
    assert not hasattr(load_model(tmp_path / "1" / "baseline.skops").estimator.named_steps["tfidf"],
                       "_stop_words_id")


def write_old_head(head: TrainedHead, path) -> None:
    """A head file exactly as featurestore wrote it before the one model file (``heads.head.save_head``)."""
    metadata = {name: getattr(head, name) for name in ("C", "class_names", "feature_dim", "fingerprint_hash",
                                                       "fingerprint", "store_path", "sweep", "c_grid",
                                                       "train_seconds", "n_train")}
    metadata["config"] = asdict(head.config)
    sio.dump({"format": 2, "metadata": json.dumps(metadata, sort_keys=True), "estimator": head.estimator}, path)


def write_old_model(model, file_format: str, path) -> None:
    """A baseline or hybrid file as ``heads.baseline.save_skops_model`` wrote it."""
    metadata = {k: v for k, v in asdict(model).items() if k != "estimator"}
    sio.dump({"format": file_format, "metadata": json.dumps(metadata, sort_keys=True),
              "estimator": model.estimator}, path)


def test_files_of_the_old_layouts_still_load(tmp_path):
    head, baseline, hybrid = make_head(), make_baseline(), make_hybrid()
    write_old_head(head, tmp_path / "head.skops")
    write_old_model(baseline, "featurestore-baseline", tmp_path / "baseline.skops")
    write_old_model(hybrid, "featurestore-hybrid", tmp_path / "hybrid.skops")
    for name, model in (("head", head), ("baseline", baseline), ("hybrid", hybrid)):
        path = tmp_path / f"{name}.skops"
        assert model_kind(path) == name
        loaded = load_model(path)
        assert type(loaded) is type(model) and same_predictions(model, loaded)
    assert load_head(tmp_path / "head.skops").config == head.config
    assert load_baseline(tmp_path / "baseline.skops").sweep == baseline.sweep
    assert load_hybrid(tmp_path / "hybrid.skops").weight == hybrid.weight


def test_an_old_head_naming_a_moved_module_still_loads(tmp_path):
    """Heads written before the package layout changed name ``featurestore.scaling.FeatureScaler``."""
    head = make_head("logreg")
    write_old_head(head, tmp_path / "new.skops")
    with zipfile.ZipFile(tmp_path / "new.skops") as source, zipfile.ZipFile(tmp_path / "old.skops", "w") as old:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "schema.json":
                assert b"featurestore.heads.scaling" in data
                data = data.replace(b"featurestore.heads.scaling", b"featurestore.scaling")
            old.writestr(info, data)
    assert same_predictions(head, load_model(tmp_path / "old.skops"))


def test_one_trust_list_for_every_kind(tmp_path):
    import os

    from sklearn.preprocessing import FunctionTransformer

    hostile = FunctionTransformer(func=os.system)
    for file_format in ("featurestore-model", "featurestore-baseline", 2):
        path = tmp_path / f"{file_format}.skops"
        sio.dump({"format": file_format, "version": 1, "kind": "baseline", "metadata": "{}", "estimator": hostile,
                  "tensors": {}}, path)
        with pytest.raises(HeadFileError, match=rf"{path}: the model holds types featurestore does not trust: "
                                                r"posix.system"):
            load_model(path)


def test_unreadable_files_are_one_clear_line(tmp_path):
    with pytest.raises(HeadFileError, match="not found"):
        load_model(tmp_path / "missing.skops")
    garbage = tmp_path / "garbage.skops"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(HeadFileError, match="--trust-pickle"):
        load_model(garbage)
    assert model_kind(garbage) is None
    newer = tmp_path / "newer.skops"
    sio.dump({"format": "featurestore-model", "version": 9, "kind": "head", "metadata": "{}", "estimator": None,
              "tensors": {}}, newer)
    with pytest.raises(HeadFileError, match="model file version 9"):
        load_model(newer)


def small_net():
    """A small CNN with a bfloat16 top, a float16 and a bool buffer (torch is imported only by the tests that use
    it)."""
    import torch

    net = torch.nn.Module()
    net.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    net.top = torch.nn.Linear(4, 3).to(torch.bfloat16)
    net.register_buffer("scale", torch.tensor([0.1, 3.0], dtype=torch.float16))
    net.register_buffer("mask", torch.tensor([True, False]))
    return net


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    import torch

    assert list(a) == list(b)
    for key in a:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        assert torch.equal(a[key].view(torch.uint8) if a[key].dim() else a[key], b[key].view(torch.uint8)
                           if b[key].dim() else b[key]), key  # bit for bit


def test_a_torch_state_dict_round_trips_bit_exactly():
    import torch

    torch.manual_seed(0)
    net = small_net()
    net.features(torch.randn(2, 1, 6, 6))  # a training step moves the BatchNorm statistics and its counter
    state = net.state_dict()
    tensors = state_dict_to_tensors(state)
    assert all(isinstance(array, np.ndarray) for array in tensors.values())
    assert_state_dicts_equal(state, tensors_to_state_dict(tensors))
    fresh = small_net()
    fresh.load_state_dict(tensors_to_state_dict(tensors))
    assert_state_dicts_equal(state, fresh.state_dict())


@dataclass
class TinyCnnModel:
    """A model with torch weights saved the way a small CNN or a fine-tuned top would be."""

    state_dict: dict
    class_names: list[str]

    def to_model_document(self) -> ModelDocument:
        return ModelDocument(kind="test_cnn", metadata={"class_names": self.class_names},
                             tensors=state_dict_to_tensors(self.state_dict))

    @classmethod
    def from_model_document(cls, document: ModelDocument) -> "TinyCnnModel":
        return cls(state_dict=tensors_to_state_dict(document.tensors), **document.metadata)


def test_torch_weights_live_in_the_same_model_file(tmp_path):
    import torch

    register_kind("test_cnn", TinyCnnModel)
    torch.manual_seed(1)
    model = TinyCnnModel(small_net().state_dict(), ["a", "b", "c"])
    path = save_model(model, tmp_path / "cnn.skops")
    assert save_model(model, tmp_path / "again.skops").read_bytes() == path.read_bytes()
    assert model_kind(path) == "test_cnn"
    loaded = load_model(path)
    assert loaded.class_names == model.class_names
    assert_state_dicts_equal(model.state_dict, loaded.state_dict)


def test_a_pickled_head_loads_only_when_trusted(tmp_path):
    import joblib

    head = make_head()
    joblib.dump(head, tmp_path / "old.joblib")
    with pytest.raises(HeadFileError, match="--trust-pickle"):
        load_model(tmp_path / "old.joblib")
    assert same_predictions(head, load_model(tmp_path / "old.joblib", trust_pickle=True))
    joblib.dump({"not": "a head"}, tmp_path / "dict.joblib")
    with pytest.raises(HeadFileError, match="holds a dict, not a featurestore head"):
        load_head(tmp_path / "dict.joblib", trust_pickle=True)


def test_the_trusted_estimators_are_classes_of_this_scikit_learn():
    """A module scikit-learn moves would otherwise show up as a refused model file, not as this failing test."""
    import importlib

    from skops.io._utils import get_type_name

    from featurestore.heads.model_file import MODEL_ESTIMATORS

    for name in MODEL_ESTIMATORS:
        module, _, leaf = name.rpartition(".")
        assert get_type_name(getattr(importlib.import_module(module), leaf)) == name


def _fitted(config: HeadConfig) -> Pipeline:
    """``config``'s estimator fitted on random features; sgd_logreg's as the streamed fit assembles it."""
    if config.head == "knn":
        from featurestore.heads.knn import KNNClassifier

        return KNNClassifier(k=3).fit(*_features())
    if config.head == "multilayer":  # two layers' columns, each scaled by its width
        from featurestore.heads.multilayer import build_multilayer

        X, y = _features()
        half = X.shape[1] // 2
        return build_multilayer([["stem", 0, half], ["head", half, X.shape[1] - half]], 0.5, 100).fit(X, y)
    if config.head != "sgd_logreg":
        return build_estimator(config, 0.5).fit(*_features())
    from sklearn.linear_model import SGDClassifier

    from featurestore.heads.estimators import make_scaler

    X, y = _features()
    return Pipeline([("scale", make_scaler(config.normalize)),
                     ("classify", SGDClassifier(loss="log_loss", average=True, random_state=0))]).fit(X, y)


def test_skops_is_imported_without_walking_scikit_learn_and_every_model_still_loads(tmp_path):
    """Every DVC stage that reads a model file paid 0.9 s (3.4 s with torch) for skops's walk of every scikit-learn
    package at import, to list the estimators it trusts by default; featurestore trusts its own list instead. In a
    process where featurestore imported skops: a model of every head family and scaling and of every kind loads,
    neither torch nor the packages only the walk imports (``sklearn.neural_network``) were imported, and
    ``all_estimators`` is whole again after."""
    import subprocess
    import sys

    from featurestore.configs import HEADS

    files = []
    for head in HEADS:
        for normalize in ("standard", "l2", "none"):
            model = make_head()
            model.config = HeadConfig(head=head, normalize=normalize)
            model.estimator = _fitted(model.config)
            files.append(str(model.save(tmp_path / f"{head}_{normalize}.skops")))
    files += [str(make().save(tmp_path / f"{kind}.skops")) for kind, make in MODELS.items() if kind != "head"]
    script = ("import json, sys; from featurestore.heads.model_file import load_model; "
              f"models = [load_model(path) for path in {files!r}]; import sklearn.utils; "
              "print(json.dumps({'torch': 'torch' in sys.modules, 'walked': 'sklearn.neural_network' in sys.modules, "
              "'estimators': len(sklearn.utils.all_estimators()), 'models': len(models)}))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"torch": False, "walked": False, "estimators": loaded["estimators"], "models": len(files)}
    assert loaded["estimators"] > 100


@pytest.mark.parametrize("make", [make_baseline, make_hybrid], ids=["baseline", "hybrid"])
def test_a_vectorizers_vocabulary_travels_as_one_tensor_and_comes_back_whole(make, tmp_path):
    """skops keeps a dict as one node per entry (BBC News's 127,514 terms: a 90 MB file that took 3.7 s to load);
    the vocabulary is one tensor in the file, and the loaded model has the same vocabulary and predictions."""
    model = make()
    vocabulary = dict(model.estimator.named_steps["tfidf"].vocabulary_)
    model.save(tmp_path / "m.skops")
    assert model.estimator.named_steps["tfidf"].vocabulary_ == vocabulary  # the model saved is left as it was
    with zipfile.ZipFile(tmp_path / "m.skops") as archive:
        schema = archive.read("schema.json").decode()
    assert '"vocabulary_"' not in schema and "vocabulary::tfidf" in schema
    loaded = load_model(tmp_path / "m.skops")
    assert loaded.estimator.named_steps["tfidf"].vocabulary_ == vocabulary and same_predictions(model, loaded)
