import io

import numpy as np
import pytest
from PIL import Image

from featurestore.data.sources import content_id, scan_source
from featurestore.encode.images import load_image, load_rgb
from featurestore.encode.preprocess import Preprocessing
from featurestore.errors import DataError, ImageDecodeError


def save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def test_every_image_mode_becomes_rgb(tmp_path):
    gray = save(Image.new("L", (5, 4), 77), tmp_path / "gray.png")
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent → white background
    rgba = save(rgba, tmp_path / "rgba.png")
    red_palette = Image.new("RGB", (4, 4), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette = save(red_palette, tmp_path / "palette.png")
    cmyk = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    jpeg = save(Image.new("RGB", (8, 8), (0, 128, 255)), tmp_path / "rgb.jpg", quality=100)
    for path in (gray, rgba, palette, cmyk, jpeg):
        assert load_rgb(path).mode == "RGB", path
    assert load_rgb(gray).getpixel((0, 0)) == (77, 77, 77)
    assert load_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(rgba).getpixel((1, 1)) == (10, 20, 30)
    assert load_rgb(palette).getpixel((0, 0)) == (200, 10, 10)
    red = load_rgb(cmyk).getpixel((0, 0))
    assert red[0] > 200 and red[1] < 40 and red[2] < 40, red


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    rgb = np.asarray(load_rgb(path))
    assert rgb[0, :, 0].tolist() == [0, 100, 128, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"this is a text file, not an image", "not an image")],
)
def test_unreadable_files_raise_with_the_path_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert info.value.path == str(path) and reason in info.value.reason


def test_truncated_image_is_reported(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert "truncated" in info.value.reason


def test_image_folder_layout(fashion_folder):
    source = scan_source(fashion_folder)
    assert source.splits == ["train", "val", "test"]
    assert len(source.class_names) == 10 and source.class_names == sorted(source.class_names)
    assert len(source.records) == 40
    record = source.records[0]
    assert record.rel_path.startswith("train/") and record.path.is_file()
    assert source.class_names[record.label] == record.path.parent.name


def test_flat_folder_is_one_split(tmp_path):
    save(Image.new("L", (4, 4)), tmp_path / "cats" / "a.png")
    save(Image.new("L", (4, 4)), tmp_path / "dogs" / "b.png")
    source = scan_source(tmp_path)
    assert source.splits == ["all"] and source.class_names == ["cats", "dogs"]


def test_csv_manifest(tmp_path):
    save(Image.new("L", (4, 4)), tmp_path / "img" / "a.png")
    save(Image.new("L", (4, 4), 9), tmp_path / "img" / "b.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\nimg/a.png,shoe,train\nimg/b.png,bag,test\n")
    source = scan_source(manifest)
    assert source.class_names == ["bag", "shoe"]
    rows = [(r.rel_path, r.label, r.split) for r in source.records]
    assert rows == [("img/a.png", 1, "train"), ("img/b.png", 0, "test")]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nimg/a.png,shoe\n")
    with pytest.raises(DataError, match="bad.csv: manifest lacks column"):
        scan_source(bad)


def test_missing_folder_and_empty_class_are_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_source(tmp_path / "nowhere")
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    save(Image.new("L", (4, 4)), tmp_path / "train" / "full" / "a.png")
    with pytest.raises(DataError, match="empty_class: class folder is empty"):
        scan_source(tmp_path)


def test_content_id_follows_bytes_not_name(tmp_path):
    a = save(Image.new("L", (4, 4), 1), tmp_path / "a.png")
    b = tmp_path / "renamed.png"
    b.write_bytes(a.read_bytes())
    c = save(Image.new("L", (4, 4), 2), tmp_path / "c.png")
    assert content_id(a) == content_id(b) != content_id(c)
    assert len(content_id(a)) == 64


def test_grayscale_fast_path_equals_rgb_conversion(fashion_folder):
    pre = Preprocessing(image_size=50, crop_pct=0.9, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    path = next(fashion_folder.rglob("*.png"))
    assert load_image(path).mode == "L"
    fast, slow = pre(load_image(path)), pre(load_rgb(path))
    assert fast.shape == (3, 50, 50) and fast.dtype == slow.dtype
    assert bool((fast == slow).all())


def test_preprocessing_round_trips_through_its_saved_dict():
    pre = Preprocessing(image_size=50, crop_pct=0.9, interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(1, 2, 3))
    assert Preprocessing.from_dict(pre.as_dict()) == pre
