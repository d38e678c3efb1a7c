"""CUDA paths. Skipped cleanly on machines without a GPU (where the CUDA paths are tested for their errors:
tests/test_export.py, tests/test_backbones.py); run by benchmarks/gpu.py's machine with `pytest -m cuda`."""

import numpy as np
import pytest
import torch
from PIL import Image

from featurestore import FeatureStore
from featurestore.configs import HeadConfig
from featurestore.extract.launch import extract_features
from featurestore.heads.train import train_head

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available())")]


@pytest.fixture
def shapes(tmp_path):
    """4 classes of synthetic 32x32 images (a coloured square at a class-specific place), 8/4/4 per split."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        for label in range(4):
            folder = tmp_path / "shapes" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                y, x = (label // 2) * 16, (label % 2) * 16
                pixels[y:y + 14, x:x + 14] = rng.integers(150, 255, 3, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "shapes"


def test_cuda_extraction_matches_the_cpu_within_float16(shapes, tmp_path):
    options = {"image_size": 64, "crop_pct": 1.0, "workers": 0, "progress": False}
    gpu = extract_features(shapes, tmp_path / "gpu.h5", device="cuda", engine="torch", **options)
    cpu = extract_features(shapes, tmp_path / "cpu.h5", device="cpu", engine="torch", **options)
    assert gpu.device.startswith("cuda") and gpu.fingerprint_hash != cpu.fingerprint_hash  # autocast is recorded
    a, b = FeatureStore(tmp_path / "gpu.h5"), FeatureStore(tmp_path / "cpu.h5")
    assert a.fingerprint["compute"] == "autocast-float16"
    for split in a.splits:
        assert list(a.ids(split)) == list(b.ids(split))
        np.testing.assert_allclose(a.load(split)[0], b.load(split)[0], rtol=5e-2, atol=5e-2)


class Crash(Exception):
    pass


class RandomBatches:
    """A fixed random classification task on the GPU, the same batches in every run."""

    n_train = 256

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 32, generator=generator).cuda()
        self.y = (self.x[:, 0] > 0).long()

    def train_batches(self, epoch, batch_size):
        order = torch.randperm(256, generator=torch.Generator().manual_seed(epoch)).cuda()
        for start in range(0, 256, batch_size):
            picked = order[start:start + batch_size]
            yield self.x[picked], self.y[picked]

    def eval_batches(self, split):
        yield self.x, self.y


def test_a_resumed_cuda_run_equals_an_uninterrupted_one(tmp_path):
    """Float16 autocast with a GradScaler, and dropout drawing its masks from the GPU's generator: both states are
    in the checkpoint, so a run that crashes after epoch 1 and resumes ends with the same weights as a run that
    never stopped."""
    from featurestore.transfer.training import train

    def run(checkpoint, crash_at=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                    torch.nn.Linear(64, 2)).cuda()

        def on_epoch(epoch):
            model.train()
            if epoch == crash_at:
                raise Crash()

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        result, best = train(model, model.state_dict, optimizer, RandomBatches(), epochs=3, batch_size=32,
                             patience=None, device=torch.device("cuda"), run_key="cuda-resume", checkpoint=checkpoint,
                             warmup_steps=4, on_epoch=on_epoch, progress=False)
        return result, model.state_dict()

    straight, straight_weights = run(tmp_path / "a.pt")
    with pytest.raises(Crash):
        run(tmp_path / "b.pt", crash_at=2)
    saved = torch.load(tmp_path / "b.pt", weights_only=True)
    assert saved["state"]["epoch"] == 1 and saved["grad_scaler"]["scale"] > 0  # a live scaler was saved
    assert len(saved["cuda_rng"]) == torch.cuda.device_count()  # the GPUs' generators: the dropout masks
    resumed, resumed_weights = run(tmp_path / "b.pt")
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 3
    for key in straight_weights:
        torch.testing.assert_close(straight_weights[key], resumed_weights[key])
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]


def test_the_cuda_provider_is_used_when_it_really_works(shapes, tmp_path):
    from featurestore.deploy.export import export_onnx
    from featurestore.encode.runtime import make_session
    from featurestore.errors import ProviderError

    extract_features(shapes, tmp_path / "f.h5", image_size=64, crop_pct=1.0, workers=0, progress=False)
    export_onnx(train_head(tmp_path / "f.h5", HeadConfig(c_points=3, n_jobs=1)), tmp_path / "m.onnx")
    try:
        _, used = make_session(str(tmp_path / "m.onnx"), "cuda")
    except ProviderError as exc:
        pytest.skip(f"onnxruntime's CUDA provider is not usable here: {exc}")
    assert used == "cuda"
