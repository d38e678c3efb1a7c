"""One pixel pipeline: the curve's "pixels" line, the fitted pixel baseline and its exported graph all read an image
the same way (decoded as ``predict`` decodes it, 28 × 28 RGB, then PIL's grey / 255), on colour photos that are not
28 px as well as on Fashion-MNIST's own 28-px grey."""

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from featurestore.data.sources import scan_source
from featurestore.deploy.baseline_export import export_baseline_onnx, pixel_graph
from featurestore.deploy.predict import OnnxClassifier
from featurestore.heads.baseline import decode_pixels, fit_baseline, gray_pixels
from featurestore.transfer.baselines import pixel_features


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Colour images of other sizes than 28 px in two classes: scikit-image's photos (451 × 300, 600 × 400,
    640 × 427) and a 50 × 37 RGB gradient, train and val."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    ramp = np.linspace(0, 255, 50, dtype=np.float64)
    gradient = np.stack([np.tile(ramp, (37, 1)), np.tile(ramp[::-1], (37, 1)),
                         np.tile(np.linspace(0, 255, 37)[:, None], (1, 50))], axis=-1).astype(np.uint8)
    images = {("train", "cat", "chelsea"): data.chelsea(), ("train", "cat", "gradient"): gradient,
              ("train", "cup", "coffee"): data.coffee(), ("train", "cup", "rocket"): data.rocket(),
              ("val", "cat", "chelsea_flipped"): data.chelsea()[:, ::-1],
              ("val", "cup", "coffee_crop"): data.coffee()[50:350, 100:500]}
    for (split, label, name), pixels in images.items():
        (root / split / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels)).save(root / split / label / f"{name}.png")
    return root


def test_the_curves_pixels_are_the_deployed_baselines_on_colour_photos_of_other_sizes(photos):
    records = scan_source(photos).records
    assert {Image.open(r.path).size for r in records} >= {(451, 300), (50, 37)}
    deployed = gray_pixels(decode_pixels(records))
    curve = pixel_features(records)
    assert curve.shape == deployed.shape == (len(records), 28 * 28) and curve.dtype == np.float32
    np.testing.assert_array_equal(curve, deployed)


def test_the_exported_pixel_graph_reads_what_the_curve_reads(photos, tmp_path):
    source = scan_source(photos)
    split = {name: [r for r in source.records if r.split == name] for name in ("train", "val")}
    model = fit_baseline("pixels", split["train"], split["val"], source.class_names, "demo")
    export_baseline_onnx(model, tmp_path / "pixels.onnx", decode_pixels(source.records))
    classifier = OnnxClassifier(tmp_path / "pixels.onnx", "cpu")
    # predict decodes with the preprocessing stored in the graph's metadata: the baseline's decoding, exactly
    (indices, batch, failures), = list(classifier.loader(source.records, batch_size=len(source.records), workers=0))
    assert not failures and list(indices) == list(range(len(source.records)))
    np.testing.assert_array_equal(batch.numpy(), decode_pixels(source.records))
    # the graph's grey front (the function the export uses) gives the curve's features, bit for bit
    front = ort.InferenceSession(pixel_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(front.run(["features"], {"images": batch.numpy()})[0],
                                  pixel_features(source.records))
    every_level = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (1, 3, 16, 16))
    small = ort.InferenceSession(pixel_graph(16).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(small.run(["features"], {"images": np.ascontiguousarray(every_level)})[0],
                                  gray_pixels(every_level))
    # and the whole graph's probabilities are the fitted estimator's on the curve's features
    probabilities, _ = classifier(batch.numpy())
    np.testing.assert_allclose(probabilities, model.estimator.predict_proba(pixel_features(source.records)),
                               atol=1e-5)


def test_fashion_mnists_own_28_px_grey_keeps_its_values(fashion_folder_master):
    records = scan_source(fashion_folder_master).records
    raw = np.stack([np.asarray(Image.open(r.path), dtype=np.float32).ravel() / 255.0 for r in records])
    np.testing.assert_array_equal(pixel_features(records), raw)
