"""DVC stage `predict@<name>`: an exported model on its data set's test split → a CSV (+ a summary JSON beside it)."""

from dataclasses import asdict

from _params import load_params, stage_arguments

from featurestore.deploy import predict
from featurestore.utils.console import setup_logging
from featurestore.utils.timings import write_json

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("name",), {"model": "the ONNX file", "data": "the prepared data set",
                                                 "out": "the predictions (CSV)"})
    p = load_params("predict")
    summary = predict(args.model, args.data, args.out, batch_size=p["batch_size"], workers=p["workers"],
                      provider=p["provider"], top_k=p["top_k"], split=p["split"], progress=False)
    write_json(args.out.with_suffix(".json"), asdict(summary), sort_keys=True, indent=None)  # seconds: timings/
    print(summary.to_json())
