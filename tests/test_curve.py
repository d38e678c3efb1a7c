"""The learning curve on data real users have: an unreadable image, and a test split that leaks into train."""

import shutil

import pytest

from featurestore import FeatureStore
from featurestore.configs import FinetuneConfig
from featurestore.data.sources import ids_digest
from featurestore.errors import LeakError
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
    result = run_curve(store, data, tmp_path / "curve", [1], FAST, device="cpu",
                       methods=("pixels", "linear_probe", "probe_finetune"))
    points = {point["method"]: point for point in result["points"]}
    expected = ids_digest(store.ids("train")[probe_rows(store.labels("train"), 1, FAST.seed)])
    assert points["linear_probe"]["train_ids"] == points["probe_finetune"]["train_ids"] == expected
    assert points["pixels"]["n_train"] == points["linear_probe"]["n_train"] == 10


def test_the_curve_refuses_a_test_split_that_shares_images_with_train(fashion_folder, tmp_path, lite0_small):
    leaked = sorted((fashion_folder / "train").rglob("*.png"))[0]
    shutil.copy(leaked, fashion_folder / "test" / leaked.parent.name / "copy-of-a-train-image.png")
    store = tmp_path / "f.h5"
    extract_features(fashion_folder, store, model=lite0_small, workers=0, progress=False, on_duplicate="keep")
    with pytest.raises(LeakError, match="also appear in train/val"):
        run_curve(store, fashion_folder, tmp_path / "curve", [1], FAST, methods=("linear_probe",))
    allowed = run_curve(store, fashion_folder, tmp_path / "curve", [1], FAST, methods=("linear_probe",),
                        allow_overlap=True)
    assert allowed["points"][0]["method"] == "linear_probe"
