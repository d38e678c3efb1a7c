"""What `featurestore predict` reads: a class tree (labelled), a flat folder of new items (its top level; its
subfolders with --recursive), hidden folders never; every visible file is predicted or listed in ``skipped`` with a
reason. And string inputs (a TF-IDF graph) on the CUDA path's IOBinding."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from featurestore.cli import main
from featurestore.data.sources import scan_source
from featurestore.deploy.deployment import export_model
from featurestore.deploy.predict import OnnxClassifier
from featurestore.heads.baseline import fit_baseline


def _fit_and_export(data, kind, out):
    source = scan_source(data)
    split = {name: [r for r in source.records if r.split == name] for name in ("train", "val")}
    fit_baseline(kind, split["train"], split["val"], source.class_names, "demo").save(out.with_suffix(".skops"))
    export_model(out.with_suffix(".skops"), out)
    return out


@pytest.fixture(scope="module")
def pixels(fashion_folder_master, tmp_path_factory):
    """An exported image model: the raw-pixel baseline (seconds to fit and export; predict reads folders the same
    way for every image model)."""
    return _fit_and_export(fashion_folder_master, "pixels", tmp_path_factory.mktemp("pixels") / "pixels.onnx")


@pytest.fixture(scope="module")
def tfidf(tmp_path_factory):
    """An exported TF-IDF baseline: one graph whose input is strings (N, 1)."""
    root = tmp_path_factory.mktemp("tfidf")
    words = {"sport": "match goal team league", "money": "bank market shares profit", "tech": "chip software phone"}
    for split, count in (("train", 4), ("val", 2)):
        for label, vocabulary in words.items():
            folder = root / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.txt").write_text(f"story {i} about {vocabulary} and {vocabulary.split()[i % 3]}")
    return _fit_and_export(root / "data", "tfidf", root / "tfidf.onnx")


def predict_cli(capsys, model, data, out, *options):
    """`featurestore predict ... --json` in this process: (exit code, summary, stderr)."""
    logger = logging.getLogger("featurestore")
    handlers = list(logger.handlers)
    try:
        code = main(["predict", "--model", str(model), "--data", str(data), "--out", str(out), "--workers", "0",
                     "--no-progress", "--json", *map(str, options)])
    finally:  # the CLI's log handler writes to this test's captured stderr, closed after it
        logger.handlers[:] = handlers
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def rows(path):
    return {row["path"]: row for row in csv.DictReader(open(path))}


def images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("L", (28, 28), 40 * i).save(folder / name)


TOP = [f"new_{i}.png" for i in range(5)]


def test_a_flat_folder_with_a_subfolder_predicts_its_top_level_and_lists_the_subfolder_as_skipped(
        pixels, tmp_path, capsys):
    inbox = tmp_path / "inbox"
    images(inbox, TOP)
    images(inbox / "thumbs", ["t.png"])
    images(inbox / ".ipynb_checkpoints", ["old.png"])  # hidden: never read, never listed
    code, summary, err = predict_cli(capsys, pixels, inbox, tmp_path / "p.csv")
    assert code == 0, err
    predicted = rows(tmp_path / "p.csv")
    assert sorted(predicted) == TOP and {row["true_label"] for row in predicted.values()} == {""}
    assert [item["path"] for item in summary["skipped"]] == ["thumbs/t.png"]
    assert summary["layout"] == "flat" and summary["predicted"] == 5
    assert "--recursive" in summary["skipped"][0]["reason"]

    code, summary, err = predict_cli(capsys, pixels, inbox, tmp_path / "r.csv", "--recursive")
    assert code == 0, err
    assert summary["predicted"] == 6 and summary["skipped"] == []
    assert sorted(rows(tmp_path / "r.csv")) == sorted(TOP + ["thumbs/t.png"])


def test_a_flat_folder_with_only_a_hidden_subfolder_is_read_as_flat(pixels, tmp_path, capsys):
    inbox = tmp_path / "inbox"
    images(inbox, TOP)
    images(inbox / ".ipynb_checkpoints", ["new_0-checkpoint.png"])
    code, summary, err = predict_cli(capsys, pixels, inbox, tmp_path / "p.csv")
    assert code == 0, err
    assert summary["predicted"] == 5 and summary["skipped"] == []
    assert summary["layout"] == "flat"


def test_class_folders_and_split_folders_stay_a_labelled_class_tree(pixels, fashion_folder_master, tmp_path,
                                                                    capsys):
    code, summary, err = predict_cli(capsys, pixels, fashion_folder_master, tmp_path / "p.csv", "--split", "test")
    assert code == 0, err
    assert summary["predicted"] == 10 and summary["accuracy"] is not None and summary["layout"] == "tree"
    assert all(row["true_label"] for row in rows(tmp_path / "p.csv").values())

    tree = tmp_path / "tree"  # <class>/<file>, beside a hidden folder
    shutil.copytree(fashion_folder_master / "test", tree)
    images(tree / ".ipynb_checkpoints", ["x.png"])
    code, summary, err = predict_cli(capsys, pixels, tree, tmp_path / "t.csv")
    assert code == 0, err
    assert summary["predicted"] == 10 and summary["skipped"] == []
    assert all(row["true_label"] and row["split"] == "all" for row in rows(tmp_path / "t.csv").values())
    assert summary["layout"] == "tree"

    # the same folder read as new images, asked for
    code, summary, err = predict_cli(capsys, pixels, tree, tmp_path / "f.csv", "--layout", "flat", "--recursive")
    assert code == 0, err
    assert summary["layout"] == "flat" and summary["predicted"] == 10 and summary["accuracy"] is None
    assert not any(row["true_label"] for row in rows(tmp_path / "f.csv").values())


def test_files_outside_the_layout_read_are_listed_as_skipped(pixels, fashion_folder_master, tmp_path, capsys):
    tree = tmp_path / "tree"
    shutil.copytree(fashion_folder_master / "test", tree)
    images(tree, ["stray.png"])  # a file beside the class folders: auto reads a flat folder
    images(tree / "Bag" / "nested", ["deep.png"])
    code, summary, err = predict_cli(capsys, pixels, tree, tmp_path / "a.csv")
    assert code == 0, err
    assert summary["predicted"] == 1 and len(summary["skipped"]) == 11
    assert all("--recursive" in item["reason"] for item in summary["skipped"])

    code, summary, err = predict_cli(capsys, pixels, tree, tmp_path / "t.csv", "--layout", "tree")
    assert code == 0, err
    assert summary["predicted"] == 10
    skipped = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert sorted(skipped) == ["Bag/nested/deep.png", "stray.png"]
    assert all("class" in reason for reason in skipped.values())


def test_what_predict_refuses_it_says_how_to_ask_for(pixels, fashion_folder_master, tmp_path, capsys):
    code, _, err = predict_cli(capsys, pixels, fashion_folder_master, tmp_path / "p.csv", "--recursive")
    assert code == 2 and "--layout flat" in err and len(err.strip().splitlines()) == 1
    albums = tmp_path / "albums"
    images(albums / "2024", ["a.png"])
    code, _, err = predict_cli(capsys, pixels, albums, tmp_path / "p.csv", "--layout", "flat")
    assert code == 2 and "nothing to predict" in err and "--recursive" in err
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{next((fashion_folder_master / 'test' / 'Bag').iterdir())},Bag\n")
    code, _, err = predict_cli(capsys, pixels, manifest, tmp_path / "p.csv", "--layout", "flat")
    assert code == 2 and "manifest" in err


def test_string_inputs_are_bound_from_host_memory_on_the_cuda_path(tfidf, tmp_path, capsys):
    """CUDA's IOBinding path (numeric inputs copied into reused device buffers), here on the CPU provider, with a
    graph that takes strings: they cannot be a device OrtValue, so they are bound from host memory."""
    texts = ["a late goal won the match for the team", "the bank reported a profit", "a new phone chip"]
    plain = OnnxClassifier(tfidf, "cpu", io_binding=False)
    bound = OnnxClassifier(tfidf, "cpu", io_binding=True)
    bound.copy_inputs = True  # what the CUDA provider sets
    expected = plain(texts)
    for _ in range(2):
        probabilities, labels = bound(texts)
        np.testing.assert_array_equal(probabilities, expected[0])
        np.testing.assert_array_equal(labels, expected[1])
    assert bound._device_inputs == {}  # nothing was copied for the strings
    assert [bound.class_names[i] for i in labels] == ["sport", "money", "tech"]

    # a flat folder of new documents, through the command line
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i, text in enumerate(texts):
        (inbox / f"{i}.txt").write_text(text)
    code, summary, err = predict_cli(capsys, tfidf, inbox, tmp_path / "p.csv")
    assert code == 0, err
    assert [row["label"] for row in rows(tmp_path / "p.csv").values()] == ["sport", "money", "tech"]
