"""DVC stage `finetune@<store>`: fine-tune when it pays (featurestore.transfer.decision.run_finetune_stage).

Reads the plateau verdict and the logreg head (the starting classifier); writes OUT (decision.json, and when
fine-tuning ran its weights and trunk cache; when the fine-tuned network won, its registry entry and store
features.h5). ``finetune.<backbone>.methods`` lists the methods that compete (texts: probe_finetune and setfit, whose
settings are ``finetune.<backbone>.setfit``). The heads on the fine-tuned store and the verdict are stages of their own
(`train_head_ft`, `verdict`): no head's settings reach this stage but the logreg head's, through its file.
"""

import json

from _params import stage_arguments, store_entry, store_settings

from featurestore.configs import FinetuneStageOptions
from featurestore.transfer.decision import run_finetune_stage
from featurestore.utils.console import setup_logging

if __name__ == "__main__":
    setup_logging()
    args = stage_arguments(__doc__, ("store",), {
        "data": "the prepared data set", "head": "the logreg head (the starting classifier)",
        "plateau": "the plateau verdict", "out": "the stage's folder"})
    options = FinetuneStageOptions.from_params(store_settings("finetune", args.store),
                                               store_settings("extract", args.store))
    plateau = json.loads(args.plateau.read_text())
    decision = run_finetune_stage(store_entry(args.store)["backbone"], args.head, args.data, args.out, plateau,
                                  options)
    print(json.dumps({k: decision[k] for k in ("mode", "plateaued", "finetuned", "chosen", "reason")}))
