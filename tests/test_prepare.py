import numpy as np
from PIL import Image

from featurestore.data.prepare import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, prepare_fashion_mnist, read_idx


def test_prepare_writes_balanced_disjoint_splits(tmp_path):
    out = tmp_path / "prepared"
    counts = prepare_fashion_mnist(out, labels_per_class=3, val_per_class=2, test_per_class=1, seed=5, progress=False)
    assert (counts.train, counts.val, counts.test) == (30, 20, 10)
    for split, per_class in (("train", 3), ("val", 2), ("test", 1)):
        for name in FASHION_MNIST_CLASSES:
            files = sorted((out / split / name).glob("*.png"))
            assert len(files) == per_class, (split, name)
    train_names = {p.name for p in (out / "train").rglob("*.png")}
    val_names = {p.name for p in (out / "val").rglob("*.png")}
    assert not train_names & val_names
    image = Image.open(next((out / "test").rglob("*.png")))
    assert image.size == (28, 28) and image.mode == "L"


def test_prepare_is_deterministic_and_matches_the_idx_source(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare_fashion_mnist(a, 2, 1, 1, seed=3, progress=False)
    prepare_fashion_mnist(b, 2, 1, 1, seed=3, progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    sample = next(p for p in files_a if p.parts[0] == "train")
    index = int(sample.stem.split("_")[1])
    assert FASHION_MNIST_CLASSES[labels[index]] == sample.parts[1]
    assert np.array_equal(np.asarray(Image.open(a / sample)), images[index])


def test_bbc_news_is_prepared_without_its_duplicate_articles(tmp_path):
    import hashlib

    from featurestore.data.prepare import prepare_bbc_news

    counts = prepare_bbc_news(tmp_path / "bbc", labels_per_class=50, val_per_class=50, test_per_class=100)
    assert (counts.train, counts.val, counts.test, counts.duplicates_dropped) == (250, 250, 500, 98)
    files = sorted((tmp_path / "bbc").rglob("*.txt"))
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in files}) == len(files) == 1000
    assert sorted(p.name for p in (tmp_path / "bbc" / "train").iterdir()) == [
        "business", "entertainment", "politics", "sports", "tech"]


def test_bbc_news_latin1_article_is_written_as_utf8(tmp_path):
    import shutil

    from featurestore.data.prepare import bbc_news_dir, prepare_bbc_news

    corpus = bbc_news_dir() / "sports"
    assert b"\xa3" in (corpus / "199.txt").read_bytes()  # the corpus's one Latin-1 file: a pound sign
    source = tmp_path / "source" / "sports"
    source.mkdir(parents=True)
    for name in ("001.txt", "002.txt", "199.txt"):
        shutil.copyfile(corpus / name, source / name)
    prepare_bbc_news(tmp_path / "bbc", 1, 1, 1, source=tmp_path / "source")
    (copy,) = (tmp_path / "bbc").rglob("sports/199.txt")
    assert "\u00a315.8m" in copy.read_text(encoding="utf-8")
