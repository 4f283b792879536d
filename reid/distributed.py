"""Several training processes through PyTorch's own torchrun + DistributedDataParallel: one process per GPU (NCCL)
or per CPU process (gloo). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import ReidError

if TYPE_CHECKING:
    import torch

# the others wait in their next collective while the first tunes thresholds and writes checkpoints; torch is imported
# where it is used, so that the CLI and the progress bars can ask which process this is for free
TIMEOUT = timedelta(hours=2)


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Whether this process writes the run folder, logs and draws progress bars (rank 0, or the only process)."""
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Join the process group when torchrun started several processes; returns this process's device (its own GPU,
    cuda:LOCAL_RANK). One process: `device` unchanged, no group."""
    if world_size() == 1:
        return device
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, **({"device_id": device} if backend == "nccl" else {}))
    return device


def stop() -> None:
    """Leave the process group, after what still refers to it is gone: gloo aborts a process whose pending work
    outlives the interpreter."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def check(cfg, device: torch.device) -> None:
    """Refuse what several processes cannot do alike, before the run folder is opened."""
    if world_size() == 1:
        return
    if cfg.train.time_budget_min:
        raise ReidError("train.time_budget_min: the clocks of several processes would stop them at different steps; "
                        "set train.epochs (and train.max_steps_per_epoch) instead under torchrun")
    if cfg.model.sync_bn and device.type != "cuda":
        raise ReidError("model.sync_bn needs GPUs (NCCL); on CPU train without it, or with model.freeze_bn=true for "
                        "norms that do not depend on the batch")


def wrap(module: torch.nn.Module, device: torch.device, find_unused: bool) -> torch.nn.Module:
    """DistributedDataParallel around the training step when several processes train, else the module itself.
    `find_unused`: some parameters get no gradient in some steps (a frozen backbone while the head warms up)."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def has_unused_parameters(model: torch.nn.Module, side: int) -> bool:
    """Whether some trainable parameter of the network gets no gradient (a features-only backbone keeps its stages
    past the last chosen level): DDP must then look for them in each step. One forward of two blank photos."""
    import torch

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    was = model.training
    model.eval()
    out = model(torch.zeros(2, 3, side, side, device=device))
    model.train(was)
    return any(g is None for g in torch.autograd.grad(out.float().sum(), params, allow_unused=True))


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the processes (itself with one): every process then decides alike on it."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


def shared(embed, frame):
    """`embed(frame) -> (N, D)` with the rows dealt out over the processes (every world_size-th row each), gathered
    back in order on the first process; the others get None. One process: `embed(frame)`."""
    world = world_size()
    if world == 1:
        return embed(frame)
    import numpy as np
    import torch.distributed as dist

    part = embed(frame.iloc[rank()::world])
    parts = [None] * world if is_main() else None
    dist.gather_object(part, parts, dst=0)
    if not is_main():
        return None
    out = np.zeros((len(frame), part.shape[1]), part.dtype)
    for r, p in enumerate(parts):
        if len(p):  # a process with no rows (fewer rows than processes) sent an empty array
            out[r::world] = p
    return out


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
