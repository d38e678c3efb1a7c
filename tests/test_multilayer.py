"""Features from every layer (``extract --layers all``) and the multilayer head (issue 27), on the real pretrained
EfficientNet-Lite0 and all-MiniLM-L6-v2 over real images and articles: what the layer store holds and how it relates
to the penultimate store (which adding it leaves valid), the engines and verify, the head's choice of layers on val,
its file, its refusals, and the export that computes exactly the chosen layers (parity with the store + head)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from featurestore import FeatureStore
from featurestore.configs import HeadConfig, Tokenization
from featurestore.data.prepare import prepare_bbc_news
from featurestore.data.sources import scan_source
from featurestore.deploy.export import backbone_for, export_onnx, graph_backbone
from featurestore.encode.backbones import get_spec, load_backbone
from featurestore.encode.backbones.layers import layer_names, pool_layer
from featurestore.encode.fingerprint import LAYERS_DESCRIPTION, changed_keys
from featurestore.encode.images import decode_image
from featurestore.errors import BadValueError, FeaturestoreError
from featurestore.extract import extract_features, verify_store
from featurestore.heads.families import family_of
from featurestore.heads.head import load_head
from featurestore.heads.multilayer import SELECTIONS, layer_table, rows_by_id
from featurestore.heads.train import train_head

from .conftest import TEST_IMAGE_SIZE

LITE0_WIDTHS = [32, 16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320, 1280]
HEAD = HeadConfig(head="logreg", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1)
MULTILAYER = HeadConfig(head="multilayer", c_min=1e-3, c_max=1e1, c_points=5, n_jobs=1)


@pytest.fixture(scope="module")
def image_stores(fashion_folder_master, tmp_path_factory):
    """The tiny image set's penultimate store with a head on it, then its layer store beside it: (penultimate
    path, layer path, the head, the penultimate store's fingerprint hash before the layer store was made)."""
    root = tmp_path_factory.mktemp("layers")
    options = {"image_size": TEST_IMAGE_SIZE, "crop_pct": 1.0, "workers": 0, "progress": False}
    penultimate, layers = root / "lite0.h5", root / "lite0.layers.h5"
    extract_features(fashion_folder_master, penultimate, "efficientnet_lite0", **options)
    head = train_head(penultimate, HEAD)
    before = FeatureStore(penultimate).fingerprint_hash
    extract_features(fashion_folder_master, layers, "efficientnet_lite0", layers="all", **options)
    return penultimate, layers, head, before


def test_the_layer_store_holds_every_stage_pooled_and_its_head_is_the_penultimate_store(image_stores):
    penultimate, layers, _, _ = image_stores
    store, plain = FeatureStore(layers), FeatureStore(penultimate)
    fp = store.fingerprint
    assert [name for name, _ in fp["layers"]] == ["stem", *(f"block{i:02d}" for i in range(16)), "head"]
    assert [width for _, width in fp["layers"]] == LITE0_WIDTHS  # Lite0's channels, stage by stage
    assert store.feature_dim == fp["feature_dim"] == 3120 and fp["layer"] == LAYERS_DESCRIPTION
    # the two stores differ in what a row is, nothing else
    assert changed_keys(plain.fingerprint, fp) == ["code_sha256", "feature_dim", "layer", "layers"]
    for split in ("train", "val", "test"):
        X, _, ids = plain.load(split)
        np.testing.assert_allclose(rows_by_id(store, split, ids)[:, -1280:], X, atol=1e-4, rtol=1e-4)


def test_adding_the_layer_store_invalidates_no_penultimate_store_or_head(image_stores):
    penultimate, _, head, before = image_stores
    store = FeatureStore(penultimate)
    assert store.fingerprint_hash == before == head.fingerprint_hash
    head.check_store(store)  # raises on a fingerprint mismatch


def test_the_torch_engine_and_verify_reproduce_the_layer_store(image_stores):
    _, layers, _, _ = image_stores
    report = verify_store(layers, sample=6, engine="torch", progress=False)  # stored by onnxruntime (auto)
    assert report.ok and report.sampled == 6 and report.max_abs_diff < 1e-4


def test_the_stage_by_stage_forward_is_the_networks_and_stops_at_the_highest_layer():
    model = load_backbone("efficientnet_lite0", image_size=TEST_IMAGE_SIZE, crop_pct=1.0)
    low = load_backbone("efficientnet_lite0", image_size=TEST_IMAGE_SIZE, crop_pct=1.0, layers=["stem", "block02"])
    images = torch.randint(0, 256, (2, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE), dtype=torch.uint8)
    ran = []
    handles = [low.trunk.network.get_submodule(name).register_forward_hook(lambda *_, n=name: ran.append(n))
               for name in ("_blocks.3", "_conv_head")]
    with torch.inference_mode():
        assert low(images).shape == (2, 32 + 24)
        full = load_backbone("efficientnet_lite0", image_size=TEST_IMAGE_SIZE, crop_pct=1.0, layers="all")
        assert torch.equal(full(images)[:, -1280:], model(images))  # bit for bit: the same modules in order
    for handle in handles:
        handle.remove()
    assert ran == []  # nothing above block02 ran


def test_pooling_by_layout_and_the_one_line_refusals():
    grid = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(pool_layer(grid, "x"), grid.mean(dim=(2, 3)))
    assert torch.equal(pool_layer(grid, "x", channels_last=True), grid.mean(dim=(1, 2)))
    tokens = torch.arange(12.0).reshape(1, 4, 3)  # (N, T, C): the tokens' mean
    assert torch.equal(pool_layer(tokens, "x"), tokens.mean(dim=1))
    with pytest.raises(BadValueError, match="layer x: output of shape"):
        pool_layer(torch.zeros(1, 2, 3, 4, 5), "x")
    vit = get_spec("timm:vit_tiny_patch16_224")  # its position embedding sits outside any block: no split
    with pytest.raises(BadValueError, match="declares none.*--layers penultimate"):
        layer_names(vit, None)
    with pytest.raises(BadValueError, match="no layer.*block99.*its layers are stem"):
        load_backbone("efficientnet_lite0", image_size=TEST_IMAGE_SIZE, crop_pct=1.0, layers=["block99"])


def test_the_multilayer_head_chooses_layers_on_val_records_them_and_round_trips(image_stores, tmp_path):
    penultimate, layers, _, _ = image_stores
    head = train_head(layers, MULTILAYER)
    settings, table = head.settings, layer_table(FeatureStore(layers).fingerprint, "x")
    assert settings["selection"] in SELECTIONS
    assert all(entry in table for entry in settings["layers"])
    assert settings["width"] == sum(width for _, _, width in settings["layers"])
    assert head.val_accuracy == max(point["val_accuracy"] for point in head.sweep)
    assert {point["selection"] for point in head.sweep} == set(SELECTIONS)  # every candidate scored
    X, _, _ = FeatureStore(layers).load("test")
    loaded = load_head(head.save(tmp_path / "multilayer.skops"))  # skops, with its two types trusted
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    with pytest.raises(FeaturestoreError, match="holds one layer's features.*extract --layers all"):
        train_head(penultimate, MULTILAYER)


def pinned(head, store_path, names):
    """``head`` refitted at the layers ``names`` (and its C): a selection that includes the stem and a middle block
    and leaves the top out, whatever the tiny set chose."""
    store = FeatureStore(store_path)
    chosen = [entry for entry in layer_table(store.fingerprint, "x") if entry[0] in names]
    settings = {**head.settings, "selection": "pinned", "layers": chosen,
                "width": sum(width for _, _, width in chosen)}
    X, y, _ = store.load("train")
    head.estimator = family_of("multilayer").refit(head.config, settings, X, y)
    head.settings = settings
    return head


def test_the_export_computes_exactly_the_chosen_layers_and_matches_the_store_and_head(image_stores, tmp_path):
    _, layers, _, _ = image_stores
    head = pinned(train_head(layers, MULTILAYER), layers, ("stem", "block05", "block09"))
    encoder = graph_backbone(head, backbone_for(head))
    assert [name for name, _ in encoder.layers] == ["stem", "block05", "block09"]
    assert encoder.feature_dim == 32 + 80 + 112
    report = export_onnx(head, tmp_path / "multilayer.onnx")
    assert report["check"]["labels_equal"] and report["check"]["max_probability_diff"] < 1e-4
    # the graph on the test images themselves against the head on their stored rows
    store = FeatureStore(layers)
    X, _, ids = store.load("test")
    records = {r.rel_path: r for r in scan_source(store.source()).records if r.split == "test"}
    paths = [str(p) for p in store.paths("test")]
    images = np.stack([encoder.preprocessing(decode_image(records[p].path.read_bytes(), p)).numpy() for p in paths])
    session = ort.InferenceSession(str(tmp_path / "multilayer.onnx"), providers=["CPUExecutionProvider"])
    probabilities, _ = session.run(None, {"images": images})
    np.testing.assert_allclose(probabilities, head.predict_proba(X), atol=1e-4)
    assert len(ids) == len(images)


def test_a_sentence_encoder_stores_every_layer_and_exports_the_chosen_ones(tmp_path):
    data = tmp_path / "bbc"
    prepare_bbc_news(data, labels_per_class=3, val_per_class=2, test_per_class=1, seed=0)
    options = {"tokenization": Tokenization(max_length=64), "batch_size": 8, "workers": 0, "progress": False}
    extract_features(data, tmp_path / "minilm.h5", "minilm_l6", **options)
    extract_features(data, tmp_path / "minilm.layers.h5", "minilm_l6", layers="all", **options)
    store, plain = FeatureStore(tmp_path / "minilm.layers.h5"), FeatureStore(tmp_path / "minilm.h5")
    assert [name for name, _ in store.fingerprint["layers"]] == ["embeddings", *(f"layer{i}" for i in range(1, 6)),
                                                                 "head"]
    assert store.feature_dim == 7 * 384
    X, _, ids = plain.load("train")
    np.testing.assert_allclose(rows_by_id(store, "train", ids)[:, -384:], X, atol=1e-5)  # head: the sentence embedding
    head = pinned(train_head(store.path, MULTILAYER), store.path, ("embeddings", "layer3"))
    report = export_onnx(head, tmp_path / "text.onnx")
    assert report["modality"] == "text" and report["check"]["labels_equal"]
    assert report["check"]["max_probability_diff"] < 1e-4
