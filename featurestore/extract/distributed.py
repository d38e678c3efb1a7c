"""Extraction on many processes or GPUs, launched by ``torchrun`` (``torch.distributed``).

    torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT ...] -m featurestore.cli extract ...
    featurestore extract --nproc N ...        # the same, launched for you on this machine

Rank 0 takes the store's lock (once for the group), hashes the source and plans as a single process would
(``phases.plan_extraction``: what the store or the journal already holds is not run again), and sends the
list of items still to encode to every rank. Rank r encodes items r, r+N, r+2N, … on its own device
(``cuda:LOCAL_RANK`` or its share of the node's cores; the group exchanges only Python objects, over gloo)
and journals its rows under rank-qualified names (``rank<r>-part-NNNNNN.npz``) in the store's shared
journal. After a barrier, rank 0 assembles the store from its own rows (kept in memory) and the other
ranks' journal parts exactly as a single process does: the same rows in the same order, the same
fingerprint (the number of ranks is not part of it). Killed ranks lose only their unjournalled rows: a
rerun, or torchrun's own restart (``--max-restarts``), plans again and resumes from the journal.

Nodes must share the file system that holds the data, the store and its journal (the same paths on every
node, e.g. NFS): featurestore moves no data between nodes itself.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data.sources import Source
from ..encode.encoders import Encoder
from ..store.journal import ExtractionJournal
from ..store.locking import store_lock
from ..utils.atomic import temp_files_of
from .options import ExtractOptions
from .phases import ExtractSummary, PlannedItems, assemble_store, encode, plan_extraction


@dataclass(frozen=True)
class Group:
    """This process's place in a torchrun group: its global ``rank`` of ``world_size``, and its ``local_rank`` of
    the ``local_world_size`` processes on this node."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


def torchrun_group() -> Group | None:
    """The process group torchrun describes in the environment (None when not launched by torchrun)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    return Group(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def workers_per_rank(group: Group, workers: int | None, device: torch.device, cores: int | None = None) -> int:
    """DataLoader workers of one rank: ``workers`` if given, else this node's cores shared by its ranks (less the
    rank's own process), at most 8 on a GPU and 1 on a CPU rank, whose cores the model's threads already use."""
    if workers is not None:
        return workers
    share = threads_per_rank(group, cores)
    return 1 if device.type == "cpu" else max(1, min(8, share - 1))


def threads_per_rank(group: Group, cores: int | None = None) -> int:
    """CPU threads for one rank: this node's cores shared by the ranks on this node (not by every rank of the
    group: 4 nodes of 2 ranks on 16 cores give each rank 8 threads, not 2)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // min(group.local_world_size, cores))


def rank_device(group: Group, device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` when this rank should use a GPU (``device``, resolved, is a CUDA device), else the
    CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    return device


def init_group(group: Group, backend: str) -> None:
    """``init_process_group`` through torchrun's store, under a key prefix of this restart round: the agent's
    store outlives a failed round, and a restarted group must not read the dead ranks' addresses."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"featurestore/round{restart}/", store), rank=rank,
                            world_size=world_size)


def extract_distributed(encoder: Encoder, source: Source, out: str | Path, group: Group,
                        options: ExtractOptions) -> ExtractSummary | None:
    """This rank's part of a distributed extraction by ``options`` (its device resolved); returns the summary on
    rank 0, None elsewhere."""
    started = time.perf_counter()
    out = Path(out)
    device = rank_device(group, options.torch_device())
    if not dist.is_initialized():  # gloo: the group only exchanges Python objects, never tensors
        init_group(group, "gloo")
    if device.type == "cpu":  # the ranks on this node share its cores
        torch.set_num_threads(threads_per_rank(group))
    with contextlib.ExitStack() as held:
        plan, payload = None, [None]
        if group.leader:
            try:
                held.enter_context(store_lock(out, wait=options.wait))  # once for the whole group
                for stale in temp_files_of(out):
                    stale.unlink(missing_ok=True)
                plan, _ = plan_extraction(source, out, encoder, options)
                payload = [(plan.fp_hash, plan.todo)]
            except BaseException as exc:  # tell the other ranks to stop, then fail here too
                payload = [exc]
        dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], BaseException):
            dist.destroy_process_group()
            raise payload[0]
        fp_hash, todo = payload[0]
        journal = ExtractionJournal(out, fp_hash, prefix=f"rank{group.rank}-part")
        journal.load(pattern=f"rank{group.rank}-part-*.npz")  # continue this rank's numbering after a restart
        feed = PlannedItems(todo[group.rank::group.world_size], encoder)
        own, runner = encode(feed, encoder, journal, device,
                             replace(options, workers=workers_per_rank(group, options.workers, device),
                                     progress=options.progress and group.leader),
                             desc=f"extract {encoder.name} (rank 0 of {group.world_size})")
        gathered: list = [None] * group.world_size
        dist.all_gather_object(gathered, (feed.failures, getattr(runner, "truncated", 0)))
        dist.destroy_process_group()
        if not group.leader:
            return None
        # Rank 0's own rows are in memory; the other ranks' come from their journal parts.
        others: dict[str, np.ndarray] = {}
        for rank in range(1, group.world_size):
            others.update(ExtractionJournal(out, fp_hash).load(pattern=f"rank{rank}-part-*.npz"))
        new = {cid: row for cid, row in others.items() if cid not in plan.resumed} | own
        summary = ExtractSummary(out=str(out), backbone=encoder.name, fingerprint_hash=fp_hash,
                                 device=f"{device.type} × {group.world_size} ranks",
                                 engine=runner.name if runner else None)
        summary.model_images = len(new)
        summary.truncated = sum(truncated for _, truncated in gathered)
        assemble_store(plan, encoder, new, {k: v for rank, _ in gathered for k, v in rank.items()}, options.dtype,
                       summary)
        journal.clear()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary
