"""onnxruntime sessions whose execution provider is checked, never assumed.

onnxruntime-gpu lists CUDA among the available providers even on machines without a GPU, and falls
back to the CPU with a burst of errors when the CUDA libraries cannot be loaded. Here the fallback
is quiet, and what actually runs is read back from the session.

The CUDA provider is given explicit options (:data:`CUDA_PROVIDER_OPTIONS`); the CPU provider's session is
the one it always was (no spinning threads, every core or the rank's share).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from ..configs import PROVIDER_CHOICES
from ..errors import ProviderError
from ..utils.validation import check_choice

log = logging.getLogger("featurestore")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# onnxruntime's CUDA execution provider options (onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider):
# values are strings, as onnxruntime reports them back from ``session.get_provider_options()``.
CUDA_PROVIDER_OPTIONS: dict[str, str] = {
    "device_id": "0",
    # cuDNN benchmarks every convolution algorithm once per input shape and keeps the fastest: predict's batches
    # have one shape (and a last, smaller one), so the search is paid twice per run. Callers that feed many
    # batch sizes (the Python API on a stream of odd batches) may prefer "HEURISTIC".
    "cudnn_conv_algo_search": "EXHAUSTIVE",
    # let cuDNN use as much workspace as its fastest algorithm wants (memory is not what limits these models)
    "cudnn_conv_use_max_workspace": "1",
    # copies on the compute stream: the ordering is then guaranteed (a separate copy stream can race)
    "do_copy_in_default_stream": "1",
    # grow the memory arena by what is asked, not to the next power of two (a batch of 256 images at 224 px
    # would otherwise reserve up to twice its activations)
    "arena_extend_strategy": "kSameAsRequested",
}


def rank_threads() -> int:
    """Intra-op threads for a CPU session: 0 (onnxruntime's default, every core) in a single process; under
    torchrun the share of the cores that ``distributed.extract_distributed`` gave this rank, so ranks on one
    machine do not oversubscribe it."""
    if "RANK" not in os.environ:
        return 0
    import torch

    return torch.get_num_threads()


def cuda_provider_options(overrides: Mapping[str, object] | None = None) -> dict[str, str]:
    """:data:`CUDA_PROVIDER_OPTIONS` with ``overrides`` on top (e.g. ``{"device_id": 1}``), every value a string."""
    options = dict(CUDA_PROVIDER_OPTIONS)
    options.update({key: str(value) for key, value in (overrides or {}).items()})
    return options


def make_session(path: str, provider: str = "auto", intra_op_threads: int = 0,
                 cuda_options: Mapping[str, object] | None = None):
    """An ``InferenceSession`` on ``provider`` (auto: CUDA when it really works, else CPU).

    ``cuda_options`` override :data:`CUDA_PROVIDER_OPTIONS` for the CUDA provider; the CPU provider gets none.
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
    providers = [(CUDA, cuda_provider_options(cuda_options)), CPU] if wants_cuda else [CPU]
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
