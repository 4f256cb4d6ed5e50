"""Data-parallel training over torch.distributed: one fit, several processes.

Launch any fit under ``torchrun``; every process runs the same program::

    torchrun --nproc_per_node 2 -m bayes_sws.cli fit models/digits.toml

How a step is shared
--------------------
Every process holds the whole dataset and the same seeded batch generator, so all
draw the same global batch of ``B`` indices; each takes a contiguous part of it
(:meth:`DataParallel.shard`, ``torch.tensor_split``: sizes ``B_r`` differ by at most
one), the processes together covering every example of an epoch exactly once (a
distributed sampler that keeps the fit loop's resumable shuffle). Each process's
loss is the library's usual one on its part, ``L_r = (N/B_r)·NLL_r + P`` with ``P``
the prior and hyperprior terms (and a guide's entropy for VI). The single-process
loss of the global batch is ``L = (N/B)·Σ_r NLL_r + P = Σ_r (B_r/B)·L_r``, since
``Σ_r B_r/B = 1``: so :meth:`DataParallel.reduce` all-reduces ``(B_r/B)·∇L_r`` and
``(B_r/B)·L_r`` with a sum, which counts the prior once for the whole model and
gives every process exactly the single-process gradient (to round-off), whatever
the batch sizes. Guides that draw (VI) draw the same values on every process: the
fit's random streams are seeded alike and consume alike.

Gradients are reduced explicitly, in one flat buffer per step, rather than through
``DistributedDataParallel``: the trained parameters are the guide's (``AutoDelta``,
``AutoNormal``) and the network's pass-through ones, not one module's forward, and
the loss is a Pyro program; DDP's hooks would cover the network only.
Evaluation, progress and artefacts belong to the process of rank 0.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DataParallel", "current_reduction", "is_main_process", "launched"]


@dataclass
class DataParallel:
    """Shares each step among the processes of the default process group (see the module docs).

    Attributes
    ----------
    rank, world_size : int
    """

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This process's contiguous part of a global batch ``(B,)``: ``(B_r,)``, possibly empty."""
        return torch.tensor_split(index, self.world_size)[self.rank]

    def reduce(self, loss: torch.Tensor | None, parameters: list[torch.nn.Parameter], *,
               weight: float) -> torch.Tensor:
        """Sum ``weight·grad`` and ``weight·loss`` over processes; gradients are written in place.

        Parameters
        ----------
        loss : 0-dim Tensor or None
            This process's loss on its part; ``None`` for an empty part (it adds zero).
        parameters : list of Parameter
            The same list, in the same order, on every process.
        weight : float
            ``B_r / B``.

        Returns
        -------
        0-dim Tensor, the loss of the global batch (detached).
        """
        like = parameters[0]
        pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters]
        local_loss = loss.detach().reshape(1).to(like.dtype) if loss is not None else like.new_zeros(1)
        flat = torch.cat([*pieces, local_loss]) * weight
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            parameter.grad = flat[offset: offset + size].view_as(parameter).clone()
            offset += size
        return flat[-1]


def current_reduction() -> DataParallel | None:
    """A :class:`DataParallel` over the default process group, or ``None`` in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return DataParallel(rank=dist.get_rank(), world_size=dist.get_world_size())


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def launched(device: str) -> Iterator[str]:
    """Join the process group ``torchrun`` describes in the environment, if any; yield the device to use.

    Outside ``torchrun`` (no ``WORLD_SIZE`` above 1) nothing happens. Under it, the
    backend is NCCL for ``cuda`` (each process on GPU ``LOCAL_RANK``) and gloo for
    ``cpu``; the group is destroyed on leaving.

    Parameters
    ----------
    device : str
        ``"cpu"`` or ``"cuda"``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()
