"""What a fingerprint and a cached graph's key must cover: the source of every module a model's forward runs (not
only its architecture's), the versions of the libraries that code comes from (timm, transformers, the ONNX
exporter), and a float32 that means float32 on every device (no TF32 convolutions or matmuls during extraction).

The timm model has random weights written by the test (timm ships none, see test_timm.py); the sentence encoder is
a tiny random BERT built from its config: what is tested is which code and versions the keys follow, not the
features' worth. A library upgrade is simulated by reporting another version for one distribution.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from featurestore.encode.backbones import load_backbone
from featurestore.encode.engines import TorchEngine, onnx_path_for
from featurestore.encode.fingerprint import fingerprint_for
from featurestore.utils import provenance
from featurestore.utils.provenance import feature_code_digest

MODEL = "mobilenetv3_small_050"  # the smallest timm CNN: its forward runs timm.layers and timm.models code
SIZE = 64
# Modules the timm model's forward runs outside its architecture's module (timm.models.mobilenetv3).
FORWARD_MODULES = {"timm.models.mobilenetv3", "timm.models._efficientnet_blocks", "timm.layers.adaptive_avgmax_pool",
                   "timm.layers.norm_act", "torch.nn.modules.conv", "torch.nn.modules.module"}


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / f"{MODEL}.safetensors"
    save_file(timm.create_model(MODEL, pretrained=False).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def timm_small(timm_checkpoint):
    return load_backbone(f"timm:{MODEL}", weights=timm_checkpoint, image_size=SIZE, crop_pct=1.0)


@pytest.fixture
def tiny_text_model():
    """A one-layer random BERT (hidden 16) as a frozen sentence encoder, built from its config (no files)."""
    from transformers import BertConfig, BertModel

    from featurestore.encode.backbones.text_models import SPECS, TextFeatureModel

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    spec = replace(SPECS[0], name="tiny_bert", feature_dim=16)
    return TextFeatureModel(BertModel(config, add_pooling_layer=False), spec, "0" * 64, "1" * 64, Path("."))


def clear_provenance_caches():
    for value in vars(provenance).values():
        if hasattr(value, "cache_clear"):
            value.cache_clear()


@pytest.fixture
def upgrade(monkeypatch):
    """``upgrade(distribution)``: from now on the installed ``distribution`` reports another version."""
    real = importlib.metadata.version

    def simulate(distribution: str) -> None:
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: real(name) + ("+upgraded" if name == distribution else ""))
        clear_provenance_caches()

    yield simulate
    monkeypatch.undo()
    clear_provenance_caches()


def test_the_code_digest_covers_every_module_the_timm_forward_runs(timm_small):
    """Not only the architecture's module: the timm layers and blocks, and torch's modules, its forward calls."""
    assert FORWARD_MODULES <= set(timm_small.code_modules)
    fingerprint = fingerprint_for(timm_small, "float32", False)
    assert fingerprint["code_sha256"] == feature_code_digest(timm_small.code_modules)


def test_editing_a_timm_layer_the_forward_runs_changes_the_fingerprint(timm_checkpoint, tmp_path):
    """A copy of timm whose adaptive pooling module gains a line (imported first, through PYTHONPATH) gives another
    code digest than the unedited copy."""
    source = Path(timm.__file__).parent
    code = (f"from featurestore.encode.backbones import load_backbone\n"
            f"from featurestore.encode.fingerprint import fingerprint_for\n"
            f"model = load_backbone('timm:{MODEL}', weights={str(timm_checkpoint)!r}, image_size={SIZE}, "
            f"crop_pct=1.0)\n"
            f"print(fingerprint_for(model, 'float32', False)['code_sha256'])")
    digests = []
    for edit in (False, True):
        copy = tmp_path / f"edited{int(edit)}"
        shutil.copytree(source, copy / "timm", ignore=shutil.ignore_patterns("__pycache__"))
        if edit:
            with open(copy / "timm" / "layers" / "adaptive_avgmax_pool.py", "a") as file:
                file.write("\nPOOL_EDITED = True  # a change inside the forward's code\n")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(copy)})
        digests.append(run.stdout.strip().splitlines()[-1])
    assert digests[1] != digests[0]


def test_the_timm_version_is_in_the_fingerprint_of_timm_models_only(timm_small, lite0_small):
    assert fingerprint_for(timm_small, "float32", False)["libraries"]["timm"] == f"timm {timm.__version__}"
    assert "timm" not in fingerprint_for(lite0_small, "float32", False)["libraries"]  # a timm upgrade keeps Lite0's


def test_a_timm_or_exporter_upgrade_re_exports_the_timm_graph_only(timm_small, lite0_small, upgrade):
    timm_graph, lite0_graph = onnx_path_for(timm_small), onnx_path_for(lite0_small)
    upgrade("timm")
    assert onnx_path_for(timm_small) != timm_graph
    assert onnx_path_for(lite0_small) == lite0_graph
    upgrade("onnxscript")  # torch.onnx.export's exporter writes the graph
    assert onnx_path_for(lite0_small) != lite0_graph


@pytest.mark.parametrize("distribution", ["transformers", "torch", "onnxscript"])
def test_the_text_graph_key_follows_the_libraries_that_write_the_graph(tiny_text_model, upgrade, distribution):
    from featurestore.encode.text_engines import text_graph_path

    before = text_graph_path(tiny_text_model)
    upgrade(distribution)
    assert text_graph_path(tiny_text_model) != before


def test_the_text_graph_key_covers_the_transformer_code_the_forward_runs(tiny_text_model):
    from featurestore.encode.engines import graph_provenance

    graph = graph_provenance(tiny_text_model)
    assert {"transformers.models.bert.modeling_bert", "featurestore.encode.backbones.text_models"} <= set(
        graph["modules"])
    assert graph["libraries"]["transformers"] == f"transformers {importlib.metadata.version('transformers')}"


def precision_flags() -> tuple[str, str, str]:
    backends = torch.backends
    return (backends.cudnn.conv.fp32_precision, backends.cudnn.rnn.fp32_precision,
            backends.cuda.matmul.fp32_precision)


def test_the_torch_engine_computes_in_exact_float32_and_restores_the_flags(lite0_small):
    """cuDNN convolutions default to TF32 on CUDA; a store fingerprinted "float32" must not hold TF32 features. The
    flags seen inside the model's forward (CPU here: the engine sets them on every device) are IEEE float32, and
    the process's own settings come back afterwards."""
    seen = []
    before = precision_flags()
    assert before[0] == "tf32"  # torch's default: what the engine must not extract with
    hook = lite0_small.trunk.register_forward_hook(lambda *_: seen.append(precision_flags()))
    try:
        features = TorchEngine(lite0_small, torch.device("cpu"))(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))
    finally:
        hook.remove()
    assert features.shape == (2, lite0_small.feature_dim)
    assert seen == [("ieee", "ieee", "ieee")]
    assert precision_flags() == before


def test_exact_float32_restores_the_flags_after_an_error():
    from featurestore.encode.engines import exact_float32

    before = precision_flags()
    with pytest.raises(ValueError), exact_float32():
        assert precision_flags() == ("ieee", "ieee", "ieee")
        raise ValueError("a failing batch")
    assert precision_flags() == before
