"""DVC stage `train_head_ft@<store>-<head>`: a head on the fine-tuned backbone's store, when the finetune stage kept
one (FINETUNE/decision.json "chosen": "finetuned", its store FINETUNE/features.h5) → OUT/<store>_ft__<head>.skops;
OUT/status.json says what was done either way (the folder is the stage's output also when there is no such store).
A head's settings reach only its own two stages (this one and `train_head`)."""

import json

from _params import load_params, stage_arguments

from featurestore.configs import config_from_params
from featurestore.transfer.decision import train_finetuned_head

if __name__ == "__main__":
    args = stage_arguments(__doc__, ("store", "head"), {"finetune": "the finetune stage's folder",
                                                       "out": "the folder of this head"})
    config = config_from_params(load_params("train_head"), args.head)
    print(json.dumps(train_finetuned_head(config, args.finetune, args.out, store_name=args.store)))
