"""Files from elsewhere and bad values: one clear line naming the file and the problem, exit 2, no traceback,
and nothing already computed is lost."""

import json
import os
from dataclasses import dataclass

import h5py
import joblib
import numpy as np
import pytest

from featurestore.configs import HeadConfig
from featurestore.errors import HeadFileError
from featurestore.extract.launch import extract_features
from featurestore.heads.head import load_head
from featurestore.heads.train import train_head

GRID = {"c_min": 1e-2, "c_max": 1e1, "c_points": 3, "n_jobs": 1}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys):
    """The CLI in this process (`cli.main`): an exception it does not turn into one line fails the test, as a
    traceback would; argparse's usage errors exit with 2."""
    from featurestore.cli import main

    def invoke(*args) -> Result:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


def assert_one_clear_line(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert str(needle) in errors[0], errors[0]


@pytest.fixture(scope="module")
def tiny(fashion_folder_master, tmp_path_factory, lite0_small):
    folder = tmp_path_factory.mktemp("bad-input")
    extract_features(fashion_folder_master, folder / "f.h5", model=lite0_small, workers=0, progress=False)
    head = train_head(folder / "f.h5", HeadConfig(**GRID))
    head.save(folder / "head.skops")
    return folder, head


def test_damaged_and_foreign_stores(tiny, tmp_path, run):
    folder, _ = tiny
    truncated = tmp_path / "truncated.h5"
    data = (folder / "f.h5").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    assert_one_clear_line(run("info", truncated), truncated, "not a readable HDF5 file")
    assert_one_clear_line(run("train-head", "--features", truncated, "--out", tmp_path / "h.skops"), truncated)
    other_schema = tmp_path / "v9.h5"
    other_schema.write_bytes(data)
    with h5py.File(other_schema, "a") as handle:
        handle.attrs["featurestore_schema"] = 9
    assert_one_clear_line(run("info", other_schema), other_schema, "schema version 9")


def test_damaged_pickled_and_hostile_heads(tiny, tmp_path, run):
    folder, head = tiny
    garbage = tmp_path / "garbage.skops"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    assert_one_clear_line(run("export", "--head", garbage, "--out", tmp_path / "m.onnx"), garbage)
    truncated = tmp_path / "truncated.skops"
    truncated.write_bytes((folder / "head.skops").read_bytes()[:500])
    assert_one_clear_line(run("evaluate", "--heads", truncated, "--out", tmp_path / "r"), truncated)

    pickled = tmp_path / "old.joblib"
    joblib.dump(head, pickled)
    assert_one_clear_line(run("export", "--head", pickled, "--out", tmp_path / "m.onnx"), pickled, "--trust-pickle")
    with pytest.raises(HeadFileError, match="--trust-pickle"):
        load_head(pickled)
    assert load_head(pickled, trust_pickle=True).C == head.C  # an explicit opt-in still reads old heads

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    hostile = tmp_path / "hostile.skops"
    sio.dump({"format": 2, "metadata": "{}", "estimator": FunctionTransformer(func=os.system)}, hostile)
    with pytest.raises(HeadFileError, match="does not trust: posix.system"):
        load_head(hostile)


def test_an_onnx_file_without_our_metadata(tmp_path, run):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    assert_one_clear_line(run("predict", "--model", foreign, "--data", tmp_path, "--out", tmp_path / "p.csv"),
                          foreign, "not a featurestore model")
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_bytes(b"\x00\x01junk")
    assert_one_clear_line(run("predict", "--model", not_onnx, "--data", tmp_path, "--out", tmp_path / "p.csv"),
                          not_onnx)


def test_bad_manifests(fashion_folder, tmp_path, run):
    image = sorted(fashion_folder.rglob("*.png"))[0]
    cases = {
        "columns.csv": ("file,class\nimages/x.png,Bag\n", "lacks column"),
        "outside.csv": (f"path,label\n{image}\n../../etc/passwd,Bag\n".replace(f"{image}\n", f"{image},Bag\n"),
                        "lies outside"),
        "latin1.csv": (None, "not UTF-8"),
    }
    for name, (text, needle) in cases.items():
        manifest = fashion_folder / name
        if text is None:
            manifest.write_bytes("path,label\nimages/caf\xe9.png,Bag\n".encode("latin-1"))
        else:
            manifest.write_text(text)
        assert_one_clear_line(run("extract", "--data", manifest, "--out", tmp_path / "x.h5"), manifest, needle)
    assert not (tmp_path / "x.h5").exists()


def test_file_names_that_are_not_utf8(fashion_folder, tmp_path, run):
    good = sorted((fashion_folder / "train" / "Bag").iterdir())[0]
    odd = os.path.join(os.fsencode(fashion_folder / "train" / "Bag"), b"caf\xe9.png")
    with open(odd, "wb") as handle:
        handle.write(good.read_bytes())
    args = ["extract", "--data", fashion_folder, "--out", tmp_path / "x.h5", "--image-size", 32, "--workers", 0,
            "--no-progress", "--json"]
    skipped = run(*args)
    assert skipped.returncode == 0, skipped.stderr
    summary = json.loads(skipped.stdout)
    assert summary["skipped"] == [{"path": "train/Bag/caf\\xe9.png", "reason": "file name is not valid UTF-8"}]
    assert summary["extracted"] == 40
    failed = run(*args, "--on-error", "fail")
    assert_one_clear_line(failed, "caf\\xe9.png", "not valid UTF-8")


def test_a_corrupt_journal_part_costs_only_its_own_images(fashion_folder, tmp_path, lite0_small, monkeypatch):
    monkeypatch.setenv("FEATURESTORE_JOURNAL_ROWS", "8")  # a part per batch (by default ~1 s or 4,096 rows)
    out = tmp_path / "f.h5"
    broken = fashion_folder / "val" / "Trouser" / "zz_broken.png"
    broken.write_text("garbage")
    with pytest.raises(Exception, match="zz_broken.png"):
        extract_features(fashion_folder, out, model=lite0_small, batch_size=8, workers=0, progress=False,
                         on_error="fail")
    parts = sorted((tmp_path / "f.h5.partial").rglob("part-*.npz"))
    assert len(parts) >= 2
    journaled = sum(len(np.load(part)["ids"]) for part in parts)
    lost = len(np.load(parts[0])["ids"])
    parts[0].write_bytes(parts[0].read_bytes()[:100])  # disk corruption
    broken.unlink()
    summary = extract_features(fashion_folder, out, model=lite0_small, batch_size=8, workers=0, progress=False)
    assert summary.resumed == journaled - lost and summary.resumed + summary.extracted == 40


@pytest.mark.parametrize("args, needle", [
    (["extract", "--data", ".", "--out", "x.h5", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["extract", "--data", ".", "--out", "x.h5", "--crop-pct", "2"], "--crop-pct: must be in (0, 1], got 2.0"),
    (["extract", "--data", ".", "--out", "x.h5", "--image-size", "4"], "--image-size: must be at least 8, got 4"),
    (["extract", "--data", ".", "--out", "x.h5", "--workers", "-1"], "--workers: must be at least 0"),
    (["predict", "--model", "m.onnx", "--out", "p.csv"], "the following arguments are required: --data"),
    (["train-head", "--features", "f.h5", "--out", "h.skops", "--c-points", "0"], "--c-points: must be at least 1"),
    (["finetune", "--head", "h.skops", "--data", ".", "--out", "w.pth", "--epochs", "zero"], "expected an integer"),
])
def test_bad_command_line_values(args, needle, tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_clear_line(run(*args), needle)
