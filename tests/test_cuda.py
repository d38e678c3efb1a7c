"""CUDA paths. Skipped cleanly on machines without a GPU (where the CUDA paths are tested for their errors:
tests/test_export.py, tests/test_backbones.py); run by benchmarks/gpu.py's machine with `pytest -m cuda`."""

import math
import warnings
from collections import Counter
from types import SimpleNamespace

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


@pytest.mark.parametrize("fused", [False, True])
def test_a_resumed_cuda_run_equals_an_uninterrupted_one(tmp_path, fused):
    """Float16 autocast with a GradScaler, and dropout drawing its masks from the GPU's generator: both states are
    in the checkpoint, so a run that crashes after epoch 1 and resumes ends with the same weights as a run that
    never stopped; also with fused AdamW (the fine-tunes' optimiser on CUDA), whose step counts live on the GPU."""
    from featurestore.transfer.training import train

    def run(checkpoint, crash_at=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                    torch.nn.Linear(64, 2)).cuda()

        def on_epoch(epoch):
            model.train()
            if epoch == crash_at:
                raise Crash()

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
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


def lite0_top(first_block: int = 14):
    """EfficientNet-Lite0's architecture (random weights: nothing to download) cut below ``first_block``, on the
    GPU, with what fine-tuning trains there (the top blocks, head convolution and a 4-class classifier, BatchNorm
    frozen): the trainable top, its config and the (C, H, W) of its 64 px inputs."""
    from featurestore.encode.backbones import get_spec
    from featurestore.transfer.finetune import FinetuneConfig
    from featurestore.transfer.trunk import UpperBlocks, activation_shape

    network = get_spec("efficientnet_lite0").build()
    network._fc = torch.nn.Linear(network.feature_dim, 4)
    trainable = tuple(f"_blocks.{i}." for i in range(first_block, len(network._blocks))) + ("_conv_head.", "_fc.")
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(name.startswith(trainable) and "._bn" not in name)
    shape = activation_shape(network, first_block, 64)
    return UpperBlocks(network, first_block).cuda(), FinetuneConfig(unfreeze_blocks=16 - first_block), shape


def test_fine_tuning_steps_with_fused_adamw_on_cuda():
    """Both fine-tunes' optimisers are fused on CUDA (no per-step `.item()` in GradScaler.step), and torch's
    default AdamW for parameters on the CPU."""
    from featurestore.transfer.finetune import optimizer_for
    from featurestore.transfer.text_finetune import text_optimizer

    top, config, _ = lite0_top()
    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    text_top = SimpleNamespace(model=SimpleNamespace(encoder=SimpleNamespace(encoder=SimpleNamespace(layer=layers))),
                               first_layer=1, classifier=torch.nn.Linear(4, 2))
    assert text_optimizer(text_top, config).defaults["fused"] is None  # on the CPU
    layers.cuda()
    text_top.classifier.cuda()
    for optimizer in (optimizer_for(top, config), text_optimizer(text_top, config)):
        assert optimizer.defaults["fused"] is True and getattr(optimizer, "_step_supports_amp_scaling", False)
    assert optimizer_for(top.cpu(), config).defaults["fused"] is None


class SyncCount:
    """Counts the synchronising CUDA calls torch reports (``torch.cuda.set_sync_debug_mode("warn")``: a warning
    per device→host copy, ``.item()``, stream synchronisation, …), by (phase, epoch) of the training loop; the
    hooks that ``train()`` calls move the phase on (:class:`Phased`)."""

    MESSAGE = "synchronizing CUDA operation"

    def __init__(self):
        self.counts, self.epoch, self.phase, self._seen = Counter(), 0, ("start", 0), 0

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self.records = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self.enter("end")
        self._catcher.__exit__(*exc)

    def enter(self, phase: str) -> None:
        total = sum(self.MESSAGE in str(record.message) for record in self.records)
        self.counts[self.phase] += total - self._seen
        self._seen, self.phase = total, (phase, self.epoch)


class Phased:
    """A batch source whose batches mark the phases: "steps" from the first train batch of an epoch to the end of
    its batches, "readout" after them, "validation" from the first val batch on."""

    def __init__(self, source, sync: SyncCount):
        self.source, self.sync, self.n_train = source, sync, source.n_train

    def train_batches(self, epoch, batch_size):
        self.sync.enter("steps")
        yield from self.source.train_batches(epoch, batch_size)
        self.sync.enter("readout")

    def eval_batches(self, split):
        self.sync.enter("validation")
        yield from self.source.eval_batches(split)


class ArrayCache:
    """A stand-in for a TrunkCache (what CachedActivations reads): random float16 activations (V+1, N, C, H, W)
    for the train split, one val split, 4 classes."""

    def __init__(self, shape: tuple[int, ...], n_train: int = 64, n_val: int = 32):
        rng = np.random.default_rng(0)
        self.views, self.store = 0, SimpleNamespace(path="in memory")
        self.train_views = rng.standard_normal((1, n_train, *shape)).astype(np.float16)
        self.train_labels = rng.integers(0, 4, n_train)
        self.val = rng.standard_normal((n_val, *shape)).astype(np.float16), rng.integers(0, 4, n_val)

    def split(self, name, rows=None):
        return self.val


def _counted_run(source: str, shapes, fused: bool = True, epochs: int = 3, batch_size: int = 16):
    """A CUDA training run of ``epochs`` under :class:`SyncCount`: the trunk cache's path (Lite0's top 2 blocks
    on cached activations, fine-tuning's optimiser and epoch setup) or the images path (the whole network on
    decoded 32 px images, one persistent decode worker). Returns the counts, steps per epoch and the epochs."""
    from featurestore.data.sources import scan_source
    from featurestore.encode.backbones import get_spec
    from featurestore.encode.backbones.model import PixelNormalize
    from featurestore.transfer.augment import ViewRecipe
    from featurestore.transfer.finetune import epoch_setup, optimizer_for
    from featurestore.transfer.training import CachedActivations, ImageBatches, adamw, train
    from featurestore.transfer.trunk import UpperBlocks

    device = torch.device("cuda")
    torch.manual_seed(0)
    if source == "cache":
        top, config, shape = lite0_top()
        batches = CachedActivations(ArrayCache(shape), device)
        optimizer, setup = optimizer_for(top, config), epoch_setup(top, config)
    else:
        network = get_spec("efficientnet_lite0").build()
        network._fc = torch.nn.Linear(network.feature_dim, 4)
        top = UpperBlocks(network, 0, with_stem=True).cuda()
        pre = get_spec("efficientnet_lite0").preprocessing.with_overrides(image_size=32, crop_pct=1.0)
        records = scan_source(shapes).records
        batches = ImageBatches([r for r in records if r.split == "train"], {"val": [r for r in records
                                                                                   if r.split == "val"]},
                               pre, PixelNormalize(pre), device, recipe=ViewRecipe(), workers=1)
        optimizer, setup = adamw([{"params": list(network.parameters()), "lr": 1e-3}], 1e-4), lambda _: top.train()
    if not fused:  # the same groups under torch's default (foreach) AdamW
        optimizer = torch.optim.AdamW([{"params": group["params"], "lr": group["lr"]}
                                       for group in optimizer.param_groups], weight_decay=1e-4)
    assert optimizer.defaults["fused"] is (True if fused else None)

    with SyncCount() as sync:
        sync.enter("calibration")
        torch.ones((), device=device).item()  # the instrument sees a synchronising call
        sync.enter("setup")

        def on_epoch(epoch):
            sync.epoch = epoch
            sync.enter("setup")
            setup(epoch)

        def weights_of():
            sync.enter("best")
            return top.network.state_dict()

        result, _ = train(top, weights_of, optimizer, Phased(batches, sync), epochs=epochs, batch_size=batch_size,
                          patience=None, device=device, run_key="sync", warmup_steps=2, on_epoch=on_epoch,
                          progress=False)
    assert result.epochs_run == epochs and sync.counts[("calibration", 0)] == 1, sync.counts
    return sync.counts, math.ceil(batches.n_train / batch_size), epochs


@pytest.mark.parametrize("source", ["cache", "images"])
def test_a_cuda_epoch_waits_for_the_device_once_beyond_validation(shapes, source):
    """No step of a CUDA epoch synchronises with the host (fused AdamW under the GradScaler, the loss and hits
    kept on the device, batches copied from pinned memory): the epoch's training reads the device once, after its
    last step; validation reads its answers in one copy; keeping the best weights waits once. (train() leaves
    the step loop at its step budget in the last epoch, so that epoch's readout counts among its steps.)"""
    counts, steps, epochs = _counted_run(source, shapes)
    for epoch in range(1, epochs + 1):
        training = counts[("steps", epoch)] + counts[("readout", epoch)]
        assert training <= 1, (epoch, dict(counts))
        assert counts[("setup", epoch)] == 0 and counts[("validation", epoch)] <= 1, (epoch, dict(counts))
        assert counts[("best", epoch)] <= 1, (epoch, dict(counts))
    assert steps >= 2  # so that one wait per step could not pass for one per epoch


def test_the_sync_count_sees_the_per_step_wait_of_plain_adamw(shapes):
    """The control for the test above: with torch's plain AdamW, GradScaler.step reads its inf check back with
    `.item()` every step, and the count sees it."""
    counts, steps, epochs = _counted_run("cache", shapes, fused=False)
    for epoch in range(1, epochs):
        assert counts[("steps", epoch)] >= steps, (epoch, dict(counts))
