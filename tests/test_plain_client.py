"""An exported text model used without featurestore: onnxruntime and the ``tokenizers`` library alone, from the
model's metadata, give featurestore's own probabilities; and text extraction skips a manifest's missing file."""

import json

import numpy as np
import pytest

from featurestore import FeatureStore
from featurestore.configs import HeadConfig, Tokenization
from featurestore.deploy.export import export_onnx
from featurestore.deploy.predict import OnnxClassifier
from featurestore.extract import extract_features
from featurestore.heads.train import train_head

TOPICS = {
    "business": ["Shares in the bank fell after the quarterly results disappointed investors.",
                 "The retailer said profits rose as online sales grew across Europe.",
                 "Oil prices climbed as traders worried about supply from the region.",
                 "The central bank left interest rates unchanged for a third month.",
                 "The carmaker will cut two thousand jobs to reduce its costs."],
    "sport": ["The striker scored twice in the second half to win the cup final.",
              "The champion retained her title after a five-set match at Wimbledon.",
              "The coach named an unchanged side for Saturday's league game.",
              "The goalkeeper saved a penalty in the last minute of the derby.",
              "The marathon winner broke the course record by almost a minute."],
    "politics": ["Ministers will publish the bill on Tuesday after weeks of debate in parliament.",
                 "The opposition leader called for an inquiry into the spending plans.",
                 "Voters go to the polls on Thursday in the closely fought election.",
                 "The prime minister reshuffled the cabinet after the resignation.",
                 "MPs rejected the amendment by a majority of forty votes."],
}
# far longer than 256 tokens (about 900): both long-document modes act on it
LONG = " ".join(f"In round {i} the striker scored, the bank's shares fell, and the minister spoke about the budget."
                for i in range(40))


def plain_client(model_path: str, texts: list[str]) -> np.ndarray:
    """Class probabilities (N, K) of an exported featurestore text model, with no featurestore import."""
    import onnxruntime
    from tokenizers import Tokenizer

    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    tokenizer = Tokenizer.from_str(meta["featurestore_tokenizer_json"])
    windows = json.loads(meta["featurestore_text_windows"])
    encodings = tokenizer.encode_batch(texts)
    per_text = [[encoding, *encoding.overflowing][:windows["max_windows"]] for encoding in encodings]
    shape = (len(texts), max(len(w) for w in per_text), len(encodings[0].ids))
    ids = np.full(shape, windows["pad_id"], dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)  # windows a text does not fill stay all-zero mask: ignored
    for d, text_windows in enumerate(per_text):
        for w, encoding in enumerate(text_windows):
            ids[d, w], mask[d, w] = encoding.ids, encoding.attention_mask
    return session.run(["probabilities"], {"input_ids": ids, "attention_mask": mask})[0]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Fifteen inline articles, three topics: 3 train, 1 val, 1 test per topic."""
    rows = [{"text": text, "label": topic, "split": ["train", "train", "train", "val", "test"][i]}
            for topic, texts in TOPICS.items() for i, text in enumerate(texts)]
    path = tmp_path_factory.mktemp("plain") / "texts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("tokenization", [Tokenization(), Tokenization(long_documents="chunk-mean", max_length=64,
                                                                      stride=16, max_windows=4)],
                         ids=["truncate-256", "chunk-mean"])
def test_a_plain_onnxruntime_client_gives_featurestores_probabilities(manifest, tmp_path, tokenization):
    store = tmp_path / "minilm.h5"
    extract_features(manifest, store, "minilm_l6", tokenization=tokenization, batch_size=8, workers=0,
                     progress=False)
    head = train_head(FeatureStore(store), HeadConfig(c_min=1e-2, c_max=1e2, c_points=3, n_jobs=1))
    model = tmp_path / "model.onnx"
    export_onnx(head, model)
    texts = [LONG, TOPICS["sport"][0], LONG[:300], "x"]
    expected, _ = OnnxClassifier(model, "cpu")(texts)
    got = plain_client(str(model), texts)
    assert got.shape == expected.shape == (4, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_a_manifest_row_whose_file_is_missing_is_skipped_as_not_found(tmp_path):
    (tmp_path / "doc.txt").write_text("Shares in the bank fell sharply after the results.")
    rows = [{"path": "doc.txt", "label": "business", "split": "train"},
            {"path": "gone.txt", "label": "business", "split": "train"},
            {"text": "The goalkeeper saved a penalty in the final minute.", "label": "sport", "split": "train"}]
    manifest = tmp_path / "texts.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = extract_features(manifest, tmp_path / "m.h5", "minilm_l6", workers=0, progress=False)
    assert summary.extracted == 2
    assert summary.skipped == [{"path": "gone.txt", "reason": "file not found"}]
    assert sorted(FeatureStore(tmp_path / "m.h5").paths("train")) == ["doc.txt", "texts.jsonl:3"]
