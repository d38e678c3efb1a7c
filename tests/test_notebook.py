"""The head-experiments notebook runs top to bottom on a tiny real store."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from featurestore.extract.launch import extract_features

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "head_experiments.ipynb"


@pytest.mark.slow
def test_head_experiments_notebook_executes(fashion_folder_master, lite0_small, tmp_path, monkeypatch):
    from featurestore.configs import Tokenization
    from featurestore.data.prepare import prepare_bbc_news

    store = tmp_path / "tiny.h5"
    extract_features(fashion_folder_master, store, model=lite0_small, workers=0, progress=False)
    monkeypatch.setenv("FEATURESTORE_STORE", str(store))
    monkeypatch.setenv("FEATURESTORE_AUDIT", str(tmp_path / "audit"))
    prepare_bbc_news(tmp_path / "bbc", labels_per_class=3, val_per_class=2, test_per_class=2, seed=2)
    extract_features(tmp_path / "bbc", tmp_path / "text.h5", "minilm_l6", tokenization=Tokenization(max_length=64),
                     workers=0, progress=False)
    monkeypatch.setenv("FEATURESTORE_TEXT_STORE", str(tmp_path / "text.h5"))
    monkeypatch.setenv("FEATURESTORE_TEXT_DATA", str(tmp_path / "bbc"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources=resources)
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    text = "".join(out.get("text", "") for out in outputs)
    assert "best C =" in text and "efficientnet_lite0" in text
    markdown = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
    assert any("| efficientnet_lite0 | logreg |" in table and "| efficientnet_lite0 | knn |" in table
               for table in markdown)
    assert "labels flagged;" in text and (tmp_path / "audit" / "label_issues.csv").is_file()
    assert any("| path | given | suggested | score |" in table for table in markdown)
    assert any("| MiniLM probe |" in table and "| TF-IDF + logistic regression |" in table for table in markdown)
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 3  # sweep, confusion matrix, label issues
