"""Data parallelism for sweeps launched with ``accelerate launch`` (or ``torchrun``): rank, world size, gather.

With one process every method is a no-op. Under a launcher, :class:`accelerate.PartialState` sets up the process
group (NCCL on GPUs; gloo on CPU-only machines, where ``cpu=True`` is passed so that accelerate does not fall back to
a single process).
"""

from __future__ import annotations

import os
from typing import Any

import torch


class Parallel:
    """This process's place in the launch."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = 0, 0
        if self.world > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.local_rank, self.world = state.process_index, state.local_process_index, state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
