"""One extraction loop behind the planned and the streamed paths (issue 25), and one options object.

The planned path (every file hashed first: ``on_duplicate="error"``, the trunk cache, torchrun) and the streamed
path (hashing in the workers) must write the same store from the same source, broken files included, and report
their progress from the same loop, so that the two cannot drift apart again.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import featurestore.utils.console as console
from featurestore import FeatureStore
from featurestore.configs import Tokenization
from featurestore.data.sources import scan_source
from featurestore.errors import BadValueError
from featurestore.extract import ExtractOptions, extract_features

TOPICS = {"business": "The bank raised rates and shares fell as markets weighed profit and trade figures. ",
          "sport": "The team won the match after a late goal, and the coach praised the players' defence. "}


class RecordingBar(console.tqdm):
    """tqdm, recording each bar's description, unit, total, final count and the code that opened it (the caller
    of ``progress_bar``)."""

    opened: list[dict] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.opener = sys._getframe(2).f_code

    def close(self):
        if not getattr(self, "recorded", False):  # tqdm closes again when collected
            self.recorded = True
            RecordingBar.opened.append({"desc": self.desc, "unit": self.unit, "total": self.total, "n": self.n,
                                        "opener": self.opener})
        super().close()


def _break(folder, suffix: str):
    """Scan ``folder``, then break three of its files: one that became a folder (cannot be read), one that does not
    decode, one gone since the scan (of length 0 to the text sort, which puts it first). → (the source, the three
    relative paths)."""
    files = sorted(folder.glob(f"train/*/*{suffix}"))
    unreadable, undecodable, missing = files[0], files[1], files[-1]
    undecodable.write_bytes(b"\xff\xfe not an image, not UTF-8 \xa3")
    source = scan_source(folder)
    missing.unlink()
    unreadable.unlink()
    unreadable.mkdir()
    return source, {p.relative_to(folder).as_posix() for p in (undecodable, missing, unreadable)}


def _texts(root):
    """Twelve short documents of different lengths (the streamed path sorts them by length)."""
    for topic, text in TOPICS.items():
        for i, split in enumerate(["train"] * 4 + ["val", "test"]):
            path = root / split / topic / f"{i}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text * (1 + (5 * i) % 4) + f"Story {i}.", encoding="utf-8")
    return root


def _both_paths(source, tmp_path, monkeypatch, **options):
    monkeypatch.setattr(console, "tqdm", RecordingBar)
    results = {}
    for path, on_duplicate in (("planned", "error"), ("streamed", "warn")):
        RecordingBar.opened = []
        summary = extract_features(source, tmp_path / f"{path}.h5", on_duplicate=on_duplicate, workers=0,
                                   progress=True, **options)
        bars = [bar for bar in RecordingBar.opened if bar["desc"].startswith("extract")]
        results[path] = (summary, FeatureStore(tmp_path / f"{path}.h5"), bars)
    return results["planned"], results["streamed"]


@pytest.mark.parametrize("modality", ["image", "text"])
def test_the_planned_and_the_streamed_path_write_one_store_through_one_loop(fashion_folder, lite0_small, tmp_path,
                                                                           monkeypatch, modality):
    if modality == "image":
        source, broken = _break(fashion_folder, ".png")
        options = {"model": lite0_small, "batch_size": 8, "engine": "torch"}
        rows, unit = 40 - 3, "img"
    else:
        source, broken = _break(_texts(tmp_path / "texts"), ".txt")
        options = {"backbone": "minilm_l6", "tokenization": Tokenization(max_length=32), "batch_size": 4}
        rows, unit = 12 - 3, "text"
    (planned, old, planned_bars), (streamed, new, streamed_bars) = _both_paths(source, tmp_path, monkeypatch,
                                                                              **options)
    assert planned.extracted == streamed.extracted == planned.model_images == streamed.model_images == rows
    assert {entry["path"] for entry in planned.skipped} == broken
    assert old.skipped == new.skipped == planned.skipped == streamed.skipped  # same entries, same order, same why
    assert old.splits == new.splits == ["train", "val", "test"]
    for split in old.splits:
        (X_old, y_old, ids_old), (X_new, y_new, ids_new) = old.load(split), new.load(split)
        assert list(ids_old) == list(ids_new) and list(old.paths(split)) == list(new.paths(split))
        np.testing.assert_array_equal(y_old, y_new)
        assert X_old.dtype == X_new.dtype
        if modality == "image":
            assert X_old.tobytes() == X_new.tobytes()
        else:
            # A text batch is padded to its longest document, and a document's row depends in its last bit on that
            # length (the attention's sums run over the padded positions). The planned path drops the files that do
            # not read before batching, the streamed path finds them in a batch, so a few documents share a batch
            # with others in one path than in the other: the same rows to float32 rounding, not to the bit.
            np.testing.assert_allclose(X_old, X_new, rtol=1e-5, atol=1e-6)
    # Progress: one bar over every item, with a unit (tqdm's rate), opened by the same code in both paths.
    assert len(planned_bars) == len(streamed_bars) == 1
    for bars, total in ((planned_bars, rows + 1), (streamed_bars, len(source.records))):
        # planned: the files that read (one of them does not decode); streamed: every record, read or not
        assert bars[0]["total"] == bars[0]["n"] == total and bars[0]["unit"] == unit
    assert planned_bars[0]["opener"] is streamed_bars[0]["opener"], "the two paths run two extraction loops"


def test_options_are_one_object_checked_before_any_file_is_read(fashion_folder, lite0_small, tmp_path):
    options = ExtractOptions(batch_size=8, workers=0, progress=False, engine="torch")
    with pytest.raises(Exception, match="frozen|cannot assign"):
        options.batch_size = 4
    with pytest.raises(BadValueError, match="on_error"):
        ExtractOptions(on_error="ignore")
    with pytest.raises(TypeError, match="batchsize"):
        extract_features(fashion_folder, tmp_path / "x.h5", model=lite0_small, batchsize=8)
    with pytest.raises(BadValueError, match="dtype"):
        extract_features(tmp_path / "no such folder", tmp_path / "x.h5", model=lite0_small, dtype="int8")
    # the options object and the keywords say the same; keywords given beside an object override its fields
    by_object = extract_features(fashion_folder, tmp_path / "a.h5", model=lite0_small, options=options)
    by_keywords = extract_features(fashion_folder, tmp_path / "b.h5", model=lite0_small, batch_size=8, workers=0,
                                   progress=False, engine="torch")
    assert by_object.extracted == by_keywords.extracted == 40
    a, b = FeatureStore(tmp_path / "a.h5"), FeatureStore(tmp_path / "b.h5")
    assert a.fingerprint_hash == b.fingerprint_hash
    np.testing.assert_array_equal(a.load("train")[0], b.load("train")[0])
    mixed = extract_features(fashion_folder, tmp_path / "a.h5", model=lite0_small, options=options, dtype="float16")
    assert mixed.written and FeatureStore(tmp_path / "a.h5").load("train")[0].dtype == np.float16
