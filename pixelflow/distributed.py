"""Process-group setup from torchrun's environment, and the few collectives the scripts need.

Under `torchrun`, every process gets RANK, WORLD_SIZE and LOCAL_RANK. Plain `python` (or torchrun with one
process) runs as a single process without a process group, so every helper here also works unlaunched.
Nothing assumes one node: the device comes from LOCAL_RANK, the role in the job from RANK.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job. rank / world_size are global; local_rank is on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when they are absent."""
    rank, world_size, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world_size}")
    return rank, world_size, local_rank


def parse_device(device: str | torch.device) -> torch.device:
    """torch.device(device), with a bad name said as a ValueError naming --device."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; expected cpu, cuda or cuda:N") from None


def resolve_device(device: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """The device for this process: as given, with a bare "cuda" meaning cuda:LOCAL_RANK; None means
    cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if local_rank is None:
        local_rank = env_ranks()[2]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)} does not exist: this node has {torch.cuda.device_count()} "
                             f"GPU(s) (LOCAL_RANK={local_rank})")
    return device


def init_distributed(device: str | torch.device | None = None,
                     timeout: datetime.timedelta | None = None) -> DistributedContext:
    """Join the process group when launched with WORLD_SIZE > 1 (NCCL on CUDA, gloo on the CPU).

    device: see resolve_device. timeout: how long collectives (barriers) wait for the slowest process.
    """
    rank, world_size, local_rank = env_ranks()
    device = resolve_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"timeout": timeout} if timeout is not None else {}
        if backend == "nccl":
            kwargs["device_id"] = device
        # torch._dynamo (imported lazily by torch, e.g. by nn.init on the meta device) must load before the group
        # is made: loaded after, it keeps gloo's threads alive past destroy_process_group, and a process that
        # exits on an error could then abort ("terminate called without an active exception", SIGABRT).
        # (`as`: a bare `import torch._dynamo` would make `torch` a local name of this whole function, unbound
        # at the torch.cuda.set_device call above.)
        import torch._dynamo as _dynamo  # noqa: F401
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(ctx: DistributedContext) -> None:
    """Wait for every process (a no-op for a single process)."""
    if not ctx.initialized:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def all_reduce_sum(ctx: DistributedContext, value: int) -> int:
    """Sum an integer over all processes."""
    if not ctx.initialized:
        return int(value)
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return int(tensor.item())


def host_group(ctx: DistributedContext, timeout: datetime.timedelta | None = None):
    """A group for small agreements on host-side state (a flag set by a signal handler) that must not wait for
    the GPU: NCCL's collectives on a CUDA tensor end in a device sync. A gloo group beside NCCL; the default
    group (None) when that is gloo already, or with one process. Every process must call this at one point."""
    if not ctx.initialized or dist.get_backend() != "nccl":
        return None
    return dist.new_group(backend="gloo", **({"timeout": timeout} if timeout is not None else {}))


def host_max(ctx: DistributedContext, value: int, group=None) -> int:
    """The largest `value` over all processes, through `group` from host_group (no device sync)."""
    if not ctx.initialized:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())


def agree(ctx: DistributedContext, error: BaseException | None, what: str,
          kind: type[Exception] = ValueError) -> None:
    """Every process says whether `what` failed for it; if any did, every process raises (its own error, or a
    ValueError naming how many others failed) instead of waiting at the next barrier for one that has left,
    which across nodes lasts the whole barrier timeout. kind: the class of the error raised for the others."""
    failed = all_reduce_sum(ctx, error is not None)
    if error is not None:
        raise error
    if failed:
        raise kind(f"{what} failed on {failed} other process(es) of this job; see their own error message")


def all_gather(ctx: DistributedContext, value) -> list:
    """Every process's `value` (a small picklable object), in rank order; [value] for a single process."""
    if not ctx.initialized:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def cleanup() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
