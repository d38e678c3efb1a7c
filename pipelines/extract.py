"""DVC stages `extract@<store>` and `extract_layers@<store>`: the store's data set → its feature store, with its
backbone's settings (`extract.<backbone>`, overridden by `stores.<store>.extract`): an image backbone's image
settings, a text backbone's tokenization; the items `configs/corrections/<store>.csv` (when there) leaves out or
relabels, applied to the data first. What the run did (extracted / reused / skipped, seconds) goes to the timings
folder, beside no output: it depends on what was there before, not on the inputs.

With `--layers`, OUT is a folder: `features.h5` holds every layer's pooled features (`extract --layers all`, for the
multilayer head) when `stores.<store>.layers` is `all`; otherwise only `status.json` says the store keeps none.
"""

from dataclasses import asdict
from pathlib import Path

from _params import LAYER_STORE, stage_arguments, store_entry, store_settings

from featurestore.utils.atomic import write_status
from featurestore.utils.console import setup_logging

CORRECTIONS = Path("configs/corrections")  # <store>.csv: what to leave out or relabel (configs/corrections/README.md)

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("store",), {"data": "the prepared data set", "out": "the feature store"},
                           {"layers": "all: OUT is a folder for the store's every-layer features"})
    out, layers = args.out, "penultimate"
    if args.layers is not None:
        setting = store_entry(args.store).get("layers", "penultimate")
        out = args.out / LAYER_STORE
        if setting != "all":
            out.unlink(missing_ok=True)
            write_status(args.out, {"store": args.store, "layers": setting,
                                    "reason": f"stores.{args.store}.layers is {setting}: no layer store"})
            raise SystemExit(0)
        layers = "all"
    # imported here: a store that keeps no layers only writes its status, without importing torch (3 s)
    from featurestore.configs import extract_options
    from featurestore.extract import ExtractOptions, extract_features
    from featurestore.store.locking import lock_path
    from featurestore.utils.timings import timings_path, write_timings

    corrections = CORRECTIONS / f"{args.store}.csv"
    options = ExtractOptions(**extract_options(store_settings("extract", args.store)),
                             exclude=corrections if corrections.is_file() else None, layers=layers)
    summary = extract_features(args.data, out, store_entry(args.store)["backbone"], options=options)
    if args.layers is not None:  # the folder is the stage's output: its store and status, not the writer's lock file
        lock_path(out).unlink(missing_ok=True)
        write_status(args.out, {"store": args.store, "layers": "all", "file": LAYER_STORE})
    record = timings_path(out, ".summary.json")
    if record is not None:  # the whole record, seconds included: the timings folder is no DVC output
        write_timings(record, asdict(summary), sort_keys=True)
    print(summary.to_json())
