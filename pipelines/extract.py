"""DVC stage `extract@<store>`: the store's data set → its feature store, with its backbone's settings
(`extract.<backbone>`, overridden by `stores.<store>.extract`): an image backbone's image settings, a text backbone's
tokenization; the items `configs/corrections/<store>.csv` (when there) leaves out or relabels, applied to the data
first. What the run did (extracted / reused / skipped, seconds) goes to the timings folder, beside no output:
it depends on what was there before, not on the inputs.
"""

from dataclasses import asdict
from pathlib import Path

from _params import stage_arguments, store_entry, store_settings

from featurestore.configs import extract_options
from featurestore.extract import ExtractOptions, extract_features
from featurestore.utils.console import setup_logging
from featurestore.utils.timings import timings_path, write_timings

CORRECTIONS = Path("configs/corrections")  # <store>.csv: what to leave out or relabel (configs/corrections/README.md)

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("store",), {"data": "the prepared data set", "out": "the feature store"})
    corrections = CORRECTIONS / f"{args.store}.csv"
    options = ExtractOptions(**extract_options(store_settings("extract", args.store)),
                             exclude=corrections if corrections.is_file() else None)
    summary = extract_features(args.data, args.out, store_entry(args.store)["backbone"], options=options)
    record = timings_path(args.out, ".summary.json")
    if record is not None:  # the whole record, seconds included: the timings folder is no DVC output
        write_timings(record, asdict(summary), sort_keys=True)
    print(summary.to_json())
