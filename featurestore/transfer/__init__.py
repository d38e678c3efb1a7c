"""Transfer beyond the frozen probe: fine-tuning the top of a backbone (images and texts), the baselines it is
measured against, the learning curve, the plateau rule that says when to fine-tune, and the decision that
keeps a fine-tuned network only when it pays.
"""

from ..utils.lazy import lazy_exports

# Imported on first use: these modules pull in torch.
_HOMES = {
    "FinetuneConfig": ".configs",
    "ScratchConfig": ".configs",
    "run_curve": "curve",
    "run_finetune_stage": "decision",
    "finetune": "finetune",
    "PlateauRule": "plateau",
    "detect_plateau": "plateau",
    "FinetuneResult": "probe",
    "paired_gain": "stats",
    "finetune_text": "text_finetune",
    "TrunkCache": "trunk",
}
__getattr__ = lazy_exports(__name__, _HOMES)
__all__ = list(_HOMES)
