"""DVC stage `plateau@<store>`: has the cache-only head stopped improving with more labels?

The feature store → OUT (curve + verdict with its interval, read by the finetune stage) and a PNG beside it. It
depends on the cache and its backbone's `plateau.<backbone>` only, so a head experiment does not redo it. Where
`stores.<store>.layers` is `all`, its layer store (in the --layers folder) adds the multilayer head's line, and the
rule judges the better cache-only line (transfer.plateau.detect_plateau).
"""

import json
from pathlib import Path

from _params import layer_store, stage_arguments, store_settings

from featurestore.transfer.plateau import PlateauRule, detect_plateau

if __name__ == "__main__":
    args = stage_arguments(__doc__, ("store",), {"features": "the feature store", "out": "the verdict (JSON)"},
                           {"layers": "the extract_layers stage's folder: the multilayer head's line, where there"})
    rule = store_settings("plateau", args.store)
    result = detect_plateau(args.features,
                            PlateauRule(tuple(rule["budgets"]), rule["min_gain"], rule["level"], rule["seed"]),
                            out=args.out, layers=layer_store(args.store, Path(args.layers)) if args.layers else None)
    print(json.dumps({k: result[k] for k in ("plateaued", "gain", "interval", "reason")}))
