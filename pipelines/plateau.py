"""DVC stage `plateau@<backbone>`: has the cache-only head stopped improving with more labels?

data/features/<backbone>.h5 → data/plateau/<backbone>.json (curve + verdict with its interval, read by the
finetune stage) and data/plateau/<backbone>.png. It depends on the cache and `plateau.<backbone>` only, so a
head experiment does not redo it.
"""

import json
import sys

from _params import ROOT, load_params

from featurestore.plateau import PlateauRule, detect_plateau

if __name__ == "__main__":
    backbone = sys.argv[1]
    rule = load_params("plateau")[backbone]
    result = detect_plateau(ROOT / "data" / "features" / f"{backbone}.h5",
                            PlateauRule(tuple(rule["budgets"]), rule["min_gain"], rule["level"], rule["seed"]),
                            out=ROOT / "data" / "plateau" / f"{backbone}.json")
    print(json.dumps({k: result[k] for k in ("plateaued", "gain", "interval", "reason")}))
