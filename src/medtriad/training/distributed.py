"""PyTorch's own distributed engine for training: torchrun sets the environment, we join the process group.

``torchrun --nproc_per_node=N -m medtriad train ...`` (or a multi-node rendezvous) starts one process per GPU (or CPU
worker); :func:`init_distributed` joins them (Gloo for CPU tensors, and NCCL for CUDA ones where CUDA is present, so
``--device cpu`` works on a GPU machine too) and everything else stays PyTorch's:
DistributedDataParallel averages gradients, ``all_gather_object`` collects validation results. Rank 0 alone writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_distributed() -> tuple[int, int, int]:
    """Join the process group torchrun describes (if any, and if not joined yet); returns (rank, world, local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (just ``[obj]`` without a process group)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, world: int, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_gradients(parameters: Iterable[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of parameters DDP does not own (the loss balancer's) over the ranks, as DDP does for the
    model's, so they stay identical on every rank. One all-reduce for all of them; a rank without a gradient for a
    parameter (its task absent from that rank's batch) adds zeros, and a parameter no rank has a gradient for keeps
    none (the optimizer skips it, as in a single process)."""
    params = list(parameters)
    if world == 1 or not params:
        return
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device, dtype=grads[0].dtype)
    flat = torch.cat([*grads, has])
    dist.all_reduce(flat)
    offset = 0
    for p, count in zip(params, flat[-len(params):].tolist()):
        n = p.numel()
        p.grad = (flat[offset:offset + n] / world).view_as(p) if count > 0 else None  # a new tensor per parameter
        offset += n


def broadcast_module(module: torch.nn.Module, world: int, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers of ``module`` into every rank's, in place: the loss balancer's
    GradNorm weights, which each rank updates from its own batch, so that all ranks weigh the losses alike."""
    if world == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


_KINDS = {"ValueError": ValueError, "OSError": OSError}  # errors the command line reports in one line


def on_rank0(action: Callable[[], T], rank: int, world: int) -> T:
    """Rank 0 alone runs ``action`` (checks, file writes); every rank gets its result. An error on rank 0 stops every
    rank: rank 0 raises it, the others one of the same kind (ValueError, OSError, else RuntimeError) that names it,
    so that every rank's command line reports it alike. (Other ranks would otherwise wait at their next collective:
    on one node until torchrun stops them, across nodes until the process group's timeout, 30 minutes by default.)
    Also a barrier: no rank goes on before rank 0 is done."""
    if world == 1:
        return action()
    result, error = None, None
    if rank == 0:
        try:
            result = action()
        except Exception as caught:  # any error: the other ranks must hear of it
            error = caught
    failure = None
    if error is not None:
        kind = next((name for name, k in _KINDS.items() if isinstance(error, k)), "RuntimeError")
        failure = (kind, f"rank 0 stopped the run: {type(error).__name__}: {error}")
    failure, result = broadcast((failure, result), world)
    if error is not None:
        raise error
    if failure is not None:
        kind, message = failure
        raise _KINDS.get(kind, RuntimeError)(message)
    return result
