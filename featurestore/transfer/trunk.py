"""The frozen trunk of an image backbone below its top blocks, and a cache of its activations.

Where the network is cut comes from its backbone's block split (:class:`~featurestore.encode.backbones.BlockSplit`:
EfficientNet-Lite's MBConv blocks, torchvision's ``features`` stages or ResNet's ``layer1..4``, …). Fine-tuning
the top ``k`` blocks runs the frozen part (stem and the blocks below, BatchNorm in eval mode) on exactly the same
input every epoch. The trunk cache runs it once per image and per augmented view
and keeps the activations (N, C, H, W), flattened, in an HDF5 store written by the extraction core (same
fingerprinting, incremental reuse, journal, lock). Splits: ``train`` (the clean view), ``train.view1`` …
``train.viewV`` (seeded random resized crops + flips), ``val`` and ``test`` (clean only). View k of an
image is drawn from a generator seeded by (seed, the view's id), so adding views later reuses the ones
already cached, and a resumed or distributed run computes the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.sources import Record, Source, rows_for_ids
from ..encode.backbones import FeatureModel
from ..encode.backbones.efficientnet_lite import EfficientNetLite
from ..encode.backbones.model import BlockSplit, run_steps
from ..encode.backbones.registry import LITE_BLOCKS
from ..encode.encoders import Item, Runner, view_id
from ..encode.engines import make_engine
from ..encode.images import collate_decoded, load_image
from ..encode.preprocess import Preprocessing
from ..errors import BadValueError, FeaturestoreError, ImageDecodeError, StoreError
from ..store.hdf5 import SCHEMA_VERSION, FeatureStore
from ..utils.provenance import feature_code_digest, library_versions
from .augment import ViewRecipe, random_view, view_rng

# The trunk's code: this module, the view recipe, and the registry, where EfficientNet-Lite's split is declared
# (a torchvision split is declared in its family module, already among the backbone's code modules).
TRUNK_MODULES = ("featurestore.transfer.trunk", "featurestore.transfer.augment",
                 "featurestore.encode.backbones.registry")


def split_of(network: nn.Module, split: BlockSplit | None = None) -> BlockSplit:
    """``split``, or by default the split of an EfficientNet-Lite ``network`` (any other network must be given its
    backbone's split, ``spec.blocks``)."""
    if split is not None:
        return split
    if isinstance(network, EfficientNetLite):
        return LITE_BLOCKS
    raise FeaturestoreError(f"{type(network).__name__}: no block split given (pass its backbone entry's blocks)")


def first_trainable_block(network: nn.Module, unfreeze_blocks: int, split: BlockSplit | None = None) -> int:
    """Index of the lowest block that trains when the top ``unfreeze_blocks`` of ``network``'s blocks do."""
    split = split_of(network, split)
    names = split.block_names(network)
    if not 0 <= unfreeze_blocks <= len(names):
        raise BadValueError(f"unfreeze_blocks must be in [0, {len(names)}], got {unfreeze_blocks}: "
                            f"{split.family or type(network).__name__} has {len(names)} blocks ({names[0]} … "
                            f"{names[-1]}); pass --unfreeze-blocks")
    return len(names) - unfreeze_blocks


class LowerBlocks(nn.Module):
    """The stem and ``blocks[:first_block]`` of ``network`` (its split's): normalised images (N, 3, S, S) float32 →
    activations (N, C·H·W) float32. Holds those modules only (shared with ``network``), so that an export of the
    trunk carries no weight of the layers above the cut."""

    def __init__(self, network: nn.Module, first_block: int, split: BlockSplit | None = None):
        super().__init__()
        split = split_of(network, split)
        self.steps = split.stem
        self.stem = nn.ModuleDict({_key(step): network.get_submodule(step) for step in split.stem
                                   if isinstance(step, str)})
        self.blocks = nn.ModuleList(network.get_submodule(name) for name in split.block_names(network)[:first_block])

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, 3, S, S) float32 → the activations entering the first block above the cut,
        (N, C, H, W) float32."""
        for step in self.steps:
            x = self.stem[_key(step)](x) if isinstance(step, str) else step(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.activations(x), 1)


def _key(name: str) -> str:
    return name.replace(".", "__")  # a ModuleDict key holds no dot


class UpperBlocks(nn.Module):
    """``blocks[first_block:]`` of ``network`` (its split's), then its head through the classifier (for
    EfficientNet-Lite: the head convolution, pooling, dropout and the classifier): activations (N, C, H, W) float32
    → logits (N, K). With ``first_block=0`` and ``with_stem`` it is the whole network on normalised images (the
    from-scratch baseline). Shares its modules with ``network``; ``block_names`` are the split's blocks."""

    def __init__(self, network: nn.Module, first_block: int, with_stem: bool = False,
                 split: BlockSplit | None = None):
        super().__init__()
        self.network = network
        self.split = split_of(network, split)
        self.first_block = first_block
        self.with_stem = with_stem
        self.block_names = self.split.block_names(network)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.network
        if self.with_stem:
            x = run_steps(net, self.split.stem, x)
        for name in self.block_names[self.first_block:]:
            x = net.get_submodule(name)(x)
        return run_steps(net, self.split.head, x)


def activation_shape(network: nn.Module, first_block: int, image_size: int,
                     split: BlockSplit | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the activations entering ``blocks[first_block]`` for ``image_size`` inputs."""
    lower = LowerBlocks(network, first_block, split)
    modes = [(module, module.training) for module in lower.modules()]
    lower.eval()  # one image: BatchNorm in training mode would refuse it
    with torch.inference_mode():
        x = lower.activations(torch.zeros(1, 3, image_size, image_size))
    for module, training in modes:  # the modules are the network's: leave them as they were
        module.train(training)
    return tuple(x.shape[1:])


def trunk_model(network: nn.Module, preprocessing: Preprocessing, first_block: int, backbone: str,
                weights_path: str, weights_sha256: str, code_modules: tuple[str, ...],
                split: BlockSplit | None = None) -> FeatureModel:
    """The frozen trunk as a :class:`FeatureModel` (uint8 images in, flattened activations out), so the
    extraction engines (eager torch, or the cached ONNX graph on onnxruntime) run it like any backbone."""
    shape = activation_shape(network, first_block, preprocessing.image_size, split)
    return FeatureModel(LowerBlocks(network, first_block, split), int(np.prod(shape)), preprocessing,
                        f"{backbone}.trunk{first_block}", weights_path, weights_sha256,
                        tuple(code_modules) + TRUNK_MODULES)


class ViewImages(Dataset):
    """Item i → (i, uint8 (3, S, S) or None, failure reason or None): the clean preprocessing for view 0,
    a seeded random view (see :mod:`featurestore.transfer.augment`) otherwise."""

    def __init__(self, items: list[Item], preprocessing: Preprocessing, recipe: ViewRecipe, seed: int):
        self.items, self.preprocessing, self.recipe, self.seed = items, preprocessing, recipe, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            image = load_image(item.path)
            if item.view:
                image = random_view(image, self.preprocessing, self.recipe, view_rng(self.seed, item.id))
            return index, self.preprocessing(image), None
        except ImageDecodeError as exc:
            return index, None, exc.reason
        except Exception as exc:  # a decoder bug must cost one image, not the run
            return index, None, f"cannot preprocess ({type(exc).__name__}: {exc})"


class TrunkViewsEncoder:
    """Encoder (see encoders.py) of the trunk cache: the frozen trunk on the clean view of every image and on
    ``views`` seeded augmented views of every train image."""

    unit = "view"

    def __init__(self, trunk: FeatureModel, shape: tuple[int, int, int], store_fingerprint_hash: str,
                 views: int, recipe: ViewRecipe, seed: int, dtype: str, engine: str = "auto",
                 device: torch.device | None = None):
        self.trunk, self.views, self.recipe, self.seed, self.dtype, self.engine = (
            trunk, views, recipe, seed, dtype, engine)
        # On CUDA the trunk runs under float16 autocast (the torch engine), which changes its activations.
        self.autocast = device is not None and device.type == "cuda"
        self.name = trunk.name
        self.feature_dim = trunk.feature_dim
        self.feature_shape = tuple(shape)
        self.store_fingerprint_hash = store_fingerprint_hash

    def fingerprint(self) -> dict:
        """The features' store, the cut, the view recipe and seed (not the number of views: view k is the same
        whatever their number, so adding views reuses the cached ones), dtype, code and libraries."""
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "trunk activations",
            "backbone": self.trunk.name,
            "store_fingerprint_hash": self.store_fingerprint_hash,
            "weights_sha256": self.trunk.weights_sha256,
            "feature_dim": self.feature_dim,
            "activation_shape": list(self.feature_shape),
            "preprocessing": self.trunk.preprocessing.as_dict(),
            "view_recipe": self.recipe.as_dict(),
            "seed": self.seed,
            "dtype": self.dtype,
            "compute": "autocast-float16" if self.autocast else "float32",
            "code_sha256": feature_code_digest(self.trunk.code_modules),
            "libraries": library_versions(self.trunk.code_modules),
        }

    def items(self, record: Record, content_id: str) -> list[Item]:
        clean = Item(content_id, record.path, record.rel_path, record.label, record.split)
        if record.split != "train":
            return [clean]
        return [clean] + [Item(view_id(content_id, k), record.path, record.rel_path, record.label,
                               f"train.view{k}", view=k) for k in range(1, self.views + 1)]

    def dataset(self, items: list[Item]) -> Dataset:
        return ViewImages(items, self.trunk.preprocessing, self.recipe, self.seed)

    collate = staticmethod(collate_decoded)

    def runner(self, device: torch.device) -> Runner:
        return make_engine(self.trunk, device, self.engine if device.type == "cpu" else "torch")

    def order(self, items: list[Item]) -> list[Item]:
        return items


def build_trunk_cache(network: nn.Module, preprocessing: Preprocessing, first_block: int, source: Source,
                      out: str | Path, *, backbone: str, weights_path: str, weights_sha256: str,
                      code_modules: tuple[str, ...], store_fingerprint_hash: str, views: int, recipe: ViewRecipe,
                      seed: int, dtype: str = "float16", device: str = "auto", engine: str = "auto",
                      batch_size: int = 64, workers: int = 1, progress: bool = True,
                      split: BlockSplit | None = None):
    """Run the frozen trunk below ``blocks[first_block]`` (of ``split``, default EfficientNet-Lite's) over
    ``source`` (every split's clean view, and ``views`` augmented views of train) into the store ``out``; returns
    the extraction summary."""
    from ..extract.phases import extract_with
    from ..utils.devices import resolve_device

    trunk = trunk_model(network, preprocessing, first_block, backbone, weights_path, weights_sha256, code_modules,
                        split)
    shape = activation_shape(network, first_block, preprocessing.image_size, split)
    torch_device = resolve_device(device)
    encoder = TrunkViewsEncoder(trunk, shape, store_fingerprint_hash, views, recipe, seed, dtype, engine,
                                torch_device)
    return extract_with(encoder, source, out, device=torch_device, dtype=dtype, batch_size=batch_size,
                        workers=workers, progress=progress, on_duplicate="keep")


class TrunkCache:
    """The trunk cache in memory for training: clean and augmented train activations aligned by image, and
    the clean val/test activations. Arrays are float16 or float32 as stored, (…, C, H, W); ``ids`` maps a split
    to its rows' content ids (N,) str, so a fine-tune picks its rows by content, never by position."""

    def __init__(self, path: str | Path):
        store = FeatureStore(path)
        if store.fingerprint.get("kind") != "trunk activations":
            raise StoreError(f"{store.path}: not a trunk cache (no trunk activations fingerprint)")
        self.store = store
        self.shape = tuple(store.feature_shape)
        self.class_names = store.class_names
        clean, self.train_labels, train_ids = store.load("train")
        self.ids = {"train": train_ids}
        train_paths = list(store.paths("train"))
        view_splits = sorted((s for s in store.splits if s.startswith("train.view")), key=lambda s: int(s[10:]))
        views = [clean]
        for split in view_splits:
            features, _, _ = store.load(split)
            paths = list(store.paths(split))
            if paths != train_paths:  # a view split always follows the clean one, row for row
                raise StoreError(f"{store.path}: split {split} is not aligned with train")
            views.append(features)
        self.train_views = np.stack(views).reshape(len(views), len(clean), *self.shape)  # (V+1, N, C, H, W)

    @property
    def views(self) -> int:
        return self.train_views.shape[0] - 1

    def rows_of(self, split: str, ids: np.ndarray) -> np.ndarray:
        """Rows (M,) int64 of ``split`` holding the content ids ``ids`` (M,) str, in their order."""
        if split not in self.ids:
            self.ids[split] = self.store.ids(split) if split in self.store.splits else np.zeros(0, dtype=str)
        return rows_for_ids(self.ids[split], ids, f"the trunk cache {self.store.path} ({split})")

    def split(self, name: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Clean activations (N, C, H, W) and labels (N,) int64 of ``val`` or ``test`` (``rows`` of it)."""
        features, labels, _ = self.store.load(name)
        if rows is not None:
            features, labels = features[rows], labels[rows]
        return features.reshape(len(features), *self.shape), labels
