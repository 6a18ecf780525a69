"""Data-parallel fine-tuning: ``torchrun --nproc_per_node N -m pipelines.finetune ...``, one process per GPU (NCCL),
or per CPU share (gloo).

Every process holds the whole model and draws the same global batch plans (one seeded generator); each decodes and
trains on its contiguous share of every batch (``pipelines/video_data.shard``). Gradients are averaged by
:class:`GradientAverager` rather than by ``DistributedDataParallel``: DDP ties its all-reduce to forward passes of
the module it wraps, and methods do not make one forward per backward (video ADA's ascent differentiates the model
with ``autograd.grad``; MCD and DRL step several optimisers per batch). Here every backward pass through the model
ends with one all-reduce of the gradients it produced (queued on the autograd engine, as DDP queues its own), so
each process clips and steps on the gradient of the global batch, whatever the method does between.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVE_TIMEOUT = timedelta(hours=2)    # rank 0 writes checkpoints and exports while the others wait


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one process: rank 0 of 1, nothing initialised)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory and shows progress."""
        return self.rank == 0

    def gather(self, value: object) -> list:
        """Every process's ``value`` (picklable), in rank order."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed over the processes (the same keys, in the same order, everywhere)."""
        if self.world == 1:
            return dict(values)
        totals = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(totals)
        return dict(zip(values, totals.cpu().tolist()))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors; gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def start_processes(device: str) -> Processes:
    """The process group torchrun described in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
    NCCL when training on CUDA and gloo otherwise; one process when WORLD_SIZE is absent or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return Processes(rank, world, local_rank)


class GradientAverager:
    """Averages the gradients of ``model`` over the processes at the end of each backward pass through it.

    A gradient accumulated into a parameter queues (once per backward) a callback that runs when the autograd
    engine finishes: it all-reduces, in one flat buffer, every gradient the model holds, in parameter order, and
    divides by the number of processes. Gradients left from an earlier backward are already equal everywhere, so
    averaging them again leaves them as they are. ``torch.autograd.grad`` (an ascent on the input) accumulates
    nothing and triggers nothing.
    """

    def __init__(self, model: nn.Module, world: int):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world = world
        self._queued = False
        for param in self.params:
            param.register_post_accumulate_grad_hook(self._on_gradient)

    def _on_gradient(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self._queued = False
        grads = [p.grad for p in self.params if p.grad is not None]
        counts = torch.tensor([len(grads), -len(grads)], device=_collective_device())
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if counts[0] != -counts[1]:
            raise RuntimeError(f"the training processes computed gradients for different parameters ({-counts[1]} "
                               f"to {counts[0]}): the method's steps differ between them")
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
