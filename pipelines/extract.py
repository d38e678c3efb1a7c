"""DVC stage `extract@<backbone>`: its data set → its feature store (+ a summary JSON of what the run did).

Image backbones take `extract.<backbone>`'s image settings, text backbones its tokenization.
"""

from dataclasses import asdict

from _params import load_params, stage_arguments

from featurestore.configs import extract_options
from featurestore.extract import ExtractOptions, extract_features
from featurestore.utils.console import setup_logging
from featurestore.utils.timings import write_json

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("backbone",), {"data": "the prepared data set", "out": "the feature store",
                                                     "summary": "what the run did (JSON)"})
    options = ExtractOptions(**extract_options(load_params("extract")[args.backbone]))
    summary = extract_features(args.data, args.out, args.backbone, options=options)
    write_json(args.summary, asdict(summary), sort_keys=True, indent=None)  # its seconds: in timings/
    print(summary.to_json())
