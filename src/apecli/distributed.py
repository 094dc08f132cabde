"""Extraction over several processes or machines, started by torchrun.

``torchrun --nproc_per_node N -m apecli extract …`` starts N copies; each learns its rank from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group (NCCL when it
encodes on a GPU, gloo on a CPU, even on a machine with GPUs), encodes the chunks that :func:`owns`
gives it, and waits for the others; rank 0 then assembles the one artifact. Chunks are saved in the
store's work folder, which all ranks must share (one machine, or a shared file system across machines).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Ranks:
    """This process's place among the extraction processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0


def owns(chunk: int, rank: int, world: int) -> bool:
    """Whether chunk ``chunk`` is encoded by process ``rank`` of ``world``: a pure function."""
    return chunk % world == rank


def backend_for(device: str) -> str:
    """The process group's backend for processes that encode on ``device``: NCCL for GPUs, gloo otherwise."""
    return "nccl" if device.startswith("cuda") else "gloo"


def join(device: str) -> Ranks:
    """This process's ranks, joining torchrun's process group when there are several processes.

    ``device`` is where this process encodes (see :meth:`apecli.encoder.EncoderSpec.resolved_device`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend, timeout=timedelta(hours=2))
    return ranks


def barrier(ranks: Ranks) -> None:
    """Wait until every process has reached this point."""
    if ranks.world > 1:
        import torch
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])  # the GPU join() chose, named, not guessed
        else:
            dist.barrier()


def agree(ranks: Ranks, value):
    """Rank 0's ``value`` on every process (any picklable value): one decision for all, where each
    process looking for itself might see the store at another moment."""
    if ranks.world <= 1:
        return value
    import torch.distributed as dist

    shared = [value]
    dist.broadcast_object_list(shared, src=0)  # NCCL: through the GPU join() chose
    return shared[0]


def leave(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
