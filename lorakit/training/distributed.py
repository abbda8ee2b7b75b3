"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, torch.distributed
(gloo on CPU, nccl on CUDA) carries the collectives.

Every rank holds the whole (frozen) base and the same adapter. Each optimizer step takes
world × grad_accum consecutive micro-batches of the one deterministic batch plan; rank r
computes r, r + world, ... The loss of a step is one sum over every rank's label tokens divided
by the step's total label count (known to every rank from the plan), so after one all-reduce
(SUM) of the adapter gradients — once per optimizer step, not per micro-batch, and never of the
frozen weights — every rank holds exactly the gradient a single process would compute for the
same global batch. Rank 0 alone writes, logs and evaluates.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

import torch

from ..core.sharded import is_sharded
from ..errors import LorakitError

__all__ = ["DistContext", "init_distributed", "SINGLE"]


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")  # where small collectives run (nccl needs CUDA tensors)
    sharded: list = field(default_factory=list)  # the FSDP2 modules, when the base is sharded

    @property
    def fsdp(self) -> bool:
        return bool(self.sharded)

    @property
    def loss_scale(self) -> float:
        # FSDP2 averages gradients over ranks (gloo has no pre-multiplied sum); the loss here is a
        # per-rank share of one global sum, so it is scaled up by the world size to keep that sum.
        return float(self.world) if self.fsdp else 1.0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's share of one optimizer step's micro-batches."""
        return list(items[self.rank::self.world])

    def reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over all ranks, in one flat buffer (one collective)."""
        params = [p for p in params if not is_sharded(p)]  # FSDP reduces its own (sharded) ones
        if not self.enabled or not params:
            return
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        if self.loss_scale != 1.0:
            flat /= self.loss_scale  # the loss was scaled for FSDP's averaging; these are summed
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def sum_values(self, *values: float) -> list[float]:
        """Sum a few numbers over ranks (the step's loss, a stop flag): one small all-reduce."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def shard_model(self, model: torch.nn.Module) -> int:
        """FSDP2: shard every decoder block (transformers' ``_no_split_modules`` classes) — frozen
        weights and adapters — over the ranks; returns how many blocks. Embeddings, final norm and
        head stay whole on every rank (the loss reads the head's weight directly)."""
        from torch.distributed.fsdp import fully_shard

        names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        if not blocks:
            raise LorakitError(f"train.fsdp: found no decoder blocks to shard in {type(model).__name__} "
                               "(it declares no _no_split_modules)")
        for block in blocks:
            fully_shard(block)
        self.sharded = blocks
        return len(blocks)

    def gradient_sync(self, enabled: bool) -> None:
        """FSDP2: reduce-scatter gradients on this backward or not (accumulation syncs on the last)."""
        for block in self.sharded:
            block.set_requires_gradient_sync(enabled, recurse=False)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_params(self, params: Sequence[torch.Tensor]) -> None:
        """Make every rank start from rank 0's adapter (the same seed gives the same one; this
        makes sure)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        for p in params:
            dist.broadcast(p.data, 0)

    def check_same(self, text: str, what: str) -> None:
        """Stop with a message when the ranks were started with different ``what``."""
        if not self.enabled:
            return
        import torch.distributed as dist

        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        seen: list[str] = [""] * self.world
        dist.all_gather_object(seen, digest)
        if len(set(seen)) > 1:
            odd = [r for r, d in enumerate(seen) if d != seen[0]]
            raise LorakitError(f"the ranks were started with different {what} (ranks {odd} differ from rank 0); "
                               "start every rank with the same command and files")

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = DistContext()


def init_distributed(device: torch.device, timeout_minutes: float = 30.0) -> DistContext:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, ...), or the
    single-process context when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)  # one GPU per process: "cuda" now means this rank's GPU
        device = torch.device("cuda", local_rank)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank,
                       int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), device)
