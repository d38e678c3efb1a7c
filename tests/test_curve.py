"""The learning curve on data real users have: an unreadable image, and a test split that leaks into train."""

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from featurestore import FeatureStore
from featurestore.configs import CURVE_HEAD, CurveOptions, FinetuneConfig, ScratchConfig, SetFitConfig, SmallCNNConfig
from featurestore.data.sources import ids_digest
from featurestore.errors import FeaturestoreError, LeakError
from featurestore.extract import extract_features
from featurestore.transfer.curve import run_curve
from featurestore.transfer.probe import probe_rows

pytestmark = pytest.mark.slow
FAST = FinetuneConfig(unfreeze_blocks=1, epochs=1, batch_size=8, workers=0)


@pytest.fixture
def broken(fashion_folder_master, tmp_path, lite0_small):
    """The tiny data set with a file that is not an image first in a train class folder."""
    root = tmp_path / "images"
    shutil.copytree(fashion_folder_master, root)
    first_class = sorted(p.name for p in (root / "train").iterdir())[0]
    (root / "train" / first_class / "0-broken.png").write_bytes(b"\x89PNG but truncated")
    store = tmp_path / "lite0.h5"
    extract_features(root, store, model=lite0_small, workers=0, progress=False)
    return root, FeatureStore(store)


def test_every_method_of_a_budget_trains_on_the_probes_rows_despite_an_unreadable_image(broken, tmp_path):
    data, store = broken
    result = run_curve(store, data, tmp_path / "curve", CurveOptions(
        budgets=[1], methods=("pixels", "linear_probe", "probe_finetune"), finetune=FAST, device="cpu"))
    points = {point["method"]: point for point in result["points"]}
    expected = ids_digest(store.ids("train")[probe_rows(store.labels("train"), 1, FAST.seed)])
    assert points["linear_probe"]["train_ids"] == points["probe_finetune"]["train_ids"] == expected
    assert points["pixels"]["n_train"] == points["linear_probe"]["n_train"] == 10


def test_the_curve_refuses_a_test_split_that_shares_images_with_train(fashion_folder, tmp_path, lite0_small):
    leaked = sorted((fashion_folder / "train").rglob("*.png"))[0]
    shutil.copy(leaked, fashion_folder / "test" / leaked.parent.name / "copy-of-a-train-image.png")
    store = tmp_path / "f.h5"
    extract_features(fashion_folder, store, model=lite0_small, workers=0, progress=False, on_duplicate="keep")
    options = CurveOptions(budgets=[1], methods=("linear_probe",), finetune=FAST)
    with pytest.raises(LeakError, match="also appear in train/val"):
        run_curve(store, fashion_folder, tmp_path / "curve", options)
    allowed = run_curve(store, fashion_folder, tmp_path / "curve", replace(options, budgets=[1, 500],
                                                                           allow_overlap=True))
    assert allowed["points"][0]["method"] == "linear_probe"
    # A budget past what the train split holds is said aloud: every class is short of 500, none of 1.
    counts = dict(zip(*np.unique(FeatureStore(store).labels("train"), return_counts=True), strict=True))
    names = FeatureStore(store).class_names
    assert allowed["capped_budgets"] == {"500": {names[c]: int(n) for c, n in sorted(counts.items())}}
    assert [p["capped"] for p in allowed["points"]] == [False, True]


def test_curve_options_resolve_a_params_section_once():
    root = Path(__file__).resolve().parent.parent
    params = yaml.safe_load((root / "params.yaml").read_text())
    named = yaml.safe_load((root / "configs" / "curve-images.yaml").read_text())
    options = CurveOptions.from_params(named["curve"], params["finetune"]["efficientnet_lite0"],
                                       {"weights": "models/lite0.pth"})
    assert options.budgets == (5, 10, 25, 50, 100) and options.methods == tuple(named["curve"]["methods"])
    assert options.scratch == ScratchConfig(**named["curve"]["scratch"])
    assert options.small_cnn == SmallCNNConfig(**named["curve"]["small_cnn"])
    assert options.probe == CURVE_HEAD and options.finetune == FinetuneConfig() and options.setfit == SetFitConfig()
    assert options.device == "auto" and options.weights == "models/lite0.pth" and not options.allow_overlap
    assert list(options.recorded()) == ["probe", "finetune", "scratch", "small_cnn", "setfit"]
    text = CurveOptions.from_params({**params["curve"]["minilm_l6"], "probe_normalize": "l2"},
                                    params["finetune"]["minilm_l6"])
    assert text.probe.normalize == "l2" and text.finetune.unfreeze_blocks == 2 and text.weights is None
    assert text.setfit == SetFitConfig(**params["finetune"]["minilm_l6"]["setfit"])
    with pytest.raises(FeaturestoreError, match="unknown curve params"):
        CurveOptions.from_params({"budgets": [1], "budget": 2}, {})
