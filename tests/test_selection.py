"""The head protocol (heads/selection.py, heads/families.py): settings chosen on validation, whatever they are."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer

from featurestore.configs import HeadConfig
from featurestore.errors import FeaturestoreError
from featurestore.heads import families
from featurestore.heads.estimators import choose_c
from featurestore.heads.head import load_head
from featurestore.heads.selection import choose_point, point_of, settings_of
from featurestore.heads.train import train_head
from featurestore.store.hdf5 import FeatureStore, SplitArrays, write_store
from featurestore.transfer.best import train_only_val_predictions


def test_the_best_validation_accuracy_wins_and_ties_go_by_the_preference_order():
    sweep = [{"k": 10, "temperature": 0.1, "val_accuracy": 0.8, "seconds": 1.0},
             {"k": 50, "temperature": 0.07, "val_accuracy": 0.9, "seconds": 1.0},
             {"k": 50, "temperature": 0.05, "val_accuracy": 0.9, "seconds": 1.0},
             {"k": 20, "temperature": 0.07, "val_accuracy": 0.9, "seconds": 1.0}]
    assert settings_of(choose_point(sweep, (("k", "max"), ("temperature", "min")))) == {"k": 50, "temperature": 0.05}
    assert settings_of(choose_point(sweep, (("k", "min"),))) == {"k": 20, "temperature": 0.07}
    assert point_of(sweep, {"k": 20, "temperature": 0.07}) is sweep[3]
    assert point_of(sweep, {"k": 20}) is None  # settings are matched whole
    with pytest.raises(FeaturestoreError, match="no candidate"):
        choose_point([], (("C", "min"),))


def test_choose_c_is_the_protocol_with_the_smallest_c_among_ties():
    sweep = [{"C": C, "val_accuracy": acc, "seconds": 0.0} for C, acc in ((1e-3, 0.5), (1e-2, 0.9), (1e-1, 0.9))]
    assert choose_c(sweep) == 1e-2


class ScalingChosenFamily(families.InMemoryFamily):
    """A head with two settings: C, and whether features are L2-normalised first, both chosen on validation."""

    prefer = (("l2", "min"), ("C", "min"))

    def sweep(self, config, X, y, Xv, yv, progress):
        points = []
        for l2 in (0, 1):
            for C in (1e-3, 1.0):
                model = self.build(config, {"C": C, "l2": l2}).fit(X, y)
                points.append({"C": C, "l2": l2, "val_accuracy": float(model.score(Xv, yv)), "seconds": 0.0})
        return points

    def build(self, config, settings):
        return Pipeline([("scale", Normalizer() if settings["l2"] else "passthrough"),
                         ("classify", LogisticRegression(C=settings["C"], max_iter=200))])

    def report(self, config, sweep):
        return None


@pytest.fixture
def direction_store(tmp_path):
    """Two classes told apart by a feature's direction, not its length: L2 normalisation is the right setting."""
    rng = np.random.default_rng(0)
    splits = {}
    for name, n in (("train", 60), ("val", 40)):
        labels = np.repeat([0, 1], n // 2)
        direction = np.where(labels[:, None] == 0, [1.0, 0.2], [0.2, 1.0]) + rng.normal(0, 0.15, (n, 2))
        lengths = rng.choice([0.01, 100.0], size=(n, 1))  # lengths that say nothing and swamp an unscaled fit
        ids = [f"{name}{i:060d}" for i in range(n)]
        splits[name] = SplitArrays((direction * lengths).astype(np.float32), labels, ids, ids)
    return write_store(tmp_path / "s.h5", {"backbone": "synthetic", "feature_dim": 2}, ["a", "b"], splits)


def test_a_family_with_its_own_settings_trains_records_and_refits_through_the_protocol(direction_store, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setitem(families._FAMILIES, "logreg", ScalingChosenFamily())
    head = train_head(direction_store, HeadConfig(head="logreg"))
    assert head.settings["l2"] == 1  # chosen on validation, with the C chosen beside it
    assert isinstance(head.estimator.named_steps["scale"], Normalizer)  # and refitted with those settings
    assert head.val_accuracy == max(p["val_accuracy"] for p in head.sweep) and head.val_accuracy > 0.9
    assert head.summary()["settings"] == head.settings and head.C == head.settings["C"]
    again = load_head(head.save(tmp_path / "h.skops"))
    assert again.settings == head.settings
    # the verdict refits the head at its own settings on train alone: the family builds it
    store = FeatureStore(direction_store)
    answers = train_only_val_predictions(again, store)
    _, yv, ids = store.load("val")
    assert np.mean([answers[i] == y for i, y in zip(ids.tolist(), yv, strict=True)]) == pytest.approx(head.val_accuracy)


def test_a_head_saved_before_the_protocol_has_its_c_as_its_settings(direction_store):
    head = train_head(direction_store, HeadConfig(head="logreg", c_min=1e-2, c_max=1.0, c_points=3, n_jobs=1))
    head.settings = {}
    head.__post_init__()
    assert head.settings == {"C": head.C}


def test_an_unknown_head_family_is_one_clear_line():
    with pytest.raises(FeaturestoreError, match="no head family 'multi_layer'"):
        families.family_of("multi_layer")
