"""onnxruntime sessions whose execution provider is checked, never assumed.

onnxruntime-gpu lists CUDA among the available providers even on machines without a GPU, and falls
back to the CPU with a burst of errors when the CUDA libraries cannot be loaded. Here the fallback
is quiet, and what actually runs is read back from the session.
"""

from __future__ import annotations

import logging
import os

from ..configs import PROVIDER_CHOICES
from ..errors import ProviderError
from ..utils.validation import check_choice

log = logging.getLogger("featurestore")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def rank_threads() -> int:
    """Intra-op threads for a CPU session: 0 (onnxruntime's default, every core) in a single process; under
    torchrun the share of the cores that ``distributed.extract_distributed`` gave this rank, so ranks on one
    machine do not oversubscribe it."""
    if "RANK" not in os.environ:
        return 0
    import torch

    return torch.get_num_threads()


def make_session(path: str, provider: str = "auto", intra_op_threads: int = 0):
    """An ``InferenceSession`` on ``provider`` (auto: CUDA when it really works, else CPU).

    Returns ``(session, active_provider)`` where ``active_provider`` is "cuda" or "cpu".
    """
    import onnxruntime as ort

    check_choice("provider", provider, PROVIDER_CHOICES)
    ort.set_default_logger_severity(4)  # the CUDA fallback otherwise prints errors and warnings
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wants_cuda = provider in ("auto", "cuda") and CUDA in ort.get_available_providers()
    if wants_cuda and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia-* wheels that torch brings
            ort.preload_dlls()
        except Exception as exc:  # missing libraries: the session check below reports it
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    providers = [CUDA, CPU] if wants_cuda else [CPU]
    session = ort.InferenceSession(str(path), options, providers=providers)
    active = session.get_providers()
    if provider == "cuda" and (not active or active[0] != CUDA):
        available = ", ".join(ort.get_available_providers())
        raise ProviderError(
            f"--provider cuda: the CUDA execution provider is not active in the onnxruntime session "
            f"(active: {', '.join(active)}; built with: {available}). It needs an NVIDIA GPU, its driver, and "
            f"the CUDA 13 / cuDNN 9 libraries; use --provider auto or cpu to run on the CPU."
        )
    used = "cuda" if active and active[0] == CUDA else "cpu"
    if provider == "auto":
        log.info("onnxruntime runs on %s (%s)", used, active[0])
    return session, used
