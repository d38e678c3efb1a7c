"""Image sources (ImageFolder splits or a CSV manifest), decoding to RGB, and content hashes."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError, ImageDecodeError

SPLIT_NAMES = ("train", "val", "test")
FLAT_SPLIT = "all"  # split name for an ImageFolder root without train/val/test folders
MANIFEST_COLUMNS = ("path", "label")
RGB_CONVERSION = "alpha over white; 16-bit scaled by 255/65535; CMYK, palette, grayscale via PIL"


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image: ``path`` on disk, ``rel_path`` as stored in the cache, integer ``label``."""

    path: Path
    rel_path: str
    label: int
    split: str


@dataclass(frozen=True)
class ImageSource:
    """A scanned data set: records in a stable order and the class names that labels index."""

    root: Path
    class_names: list[str]
    records: list[ImageRecord]

    @property
    def splits(self) -> list[str]:
        seen: dict[str, None] = {}
        for record in self.records:
            seen.setdefault(record.split, None)
        return list(seen)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_image_folder(root: Path) -> ImageSource:
    """``root/<split>/<class>/<file>`` for splits train/val/test, or ``root/<class>/<file>`` (split "all").

    Every visible file in a class folder is a candidate; files that do not decode are reported
    per file at extraction time. A class folder with no files is an error.
    """
    split_dirs = [(name, root / name) for name in SPLIT_NAMES if (root / name).is_dir()]
    if not split_dirs:
        split_dirs = [(FLAT_SPLIT, root)]
    per_split: list[tuple[str, Path, list[Path]]] = []
    for split, split_dir in split_dirs:
        class_dirs = _visible_dirs(split_dir)
        if not class_dirs:
            raise DataError(
                f"{split_dir}: no class folders; expected {split_dir}/<class>/<image> "
                f"(or {root}/{{train,val,test}}/<class>/<image>)"
            )
        for class_dir in class_dirs:
            files = _visible_files(class_dir)
            if not files:
                raise DataError(f"{class_dir}: class folder is empty (no image files)")
            per_split.append((split, class_dir, files))
    class_names = sorted({class_dir.name for _, class_dir, _ in per_split})
    label_of = {name: index for index, name in enumerate(class_names)}
    records = [
        ImageRecord(path, path.relative_to(root).as_posix(), label_of[class_dir.name], split)
        for split, class_dir, files in per_split
        for path in files
    ]
    return ImageSource(root, class_names, records)


def read_manifest(csv_path: Path) -> ImageSource:
    """A CSV with columns ``path,label[,split]``; relative paths are relative to the CSV's folder.

    Labels are class names; class indices follow their sorted order. A missing ``split`` column or
    an empty cell gives split "all".
    """
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in MANIFEST_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"{csv_path}: manifest lacks column(s) {missing}; found {columns}, need path,label[,split]")
        rows = []
        for line_number, row in enumerate(reader, start=2):
            path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not path or not label:
                raise DataError(f"{csv_path}:{line_number}: empty path or label")
            rows.append((path, label, (row.get("split") or "").strip() or FLAT_SPLIT))
    if not rows:
        raise DataError(f"{csv_path}: manifest has no rows")
    class_names = sorted({label for _, label, _ in rows})
    label_of = {name: index for index, name in enumerate(class_names)}
    records = []
    for path, label, split in rows:
        full = Path(path) if Path(path).is_absolute() else root / path
        records.append(ImageRecord(full, path, label_of[label], split))
    return ImageSource(root, class_names, records)


def scan_source(data: str | Path) -> ImageSource:
    """An ImageFolder root (a directory) or a CSV manifest (a ``.csv`` file)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: data folder or manifest not found")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(f"{data}: expected an image folder or a .csv manifest")
        return read_manifest(data)
    return scan_image_folder(data)


def content_id(path: Path) -> str:
    """Hex SHA-256 of the file's bytes: the image's identity in the cache (renames keep it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def to_rgb_or_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit "RGB", or "L" for single-channel images (cheaper to resize; the
    preprocessing replicates it to three equal channels, which is what RGB conversion gives).
    16-bit data is scaled (not clipped); transparency is laid on white."""
    if image.mode in ("RGB", "L"):
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit grayscale (I;16*, or I holding 16-bit values): scale 0..65535 to 0..255.
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Decode an image file fully, as "RGB" or (single-channel sources) "L".

    Raises :class:`ImageDecodeError` with the path and the reason.
    """
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError(str(path), "empty file (0 bytes)")
        with Image.open(path) as image:
            image.load()
            return to_rgb_or_gray(image)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(str(path), "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(str(path), "not an image (format not recognised)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(str(path), f"corrupt or truncated image ({exc})") from None


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file as 8-bit RGB (see :func:`load_image` for errors)."""
    return load_image(path).convert("RGB")
