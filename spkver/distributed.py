r"""What data-parallel training (``torchrun``, DDP) needs beyond SpeechBrain's wrapper.

Launched by ``torchrun`` the recipe runs one process per device, NCCL on
GPUs and gloo on CPUs (chosen by :func:`choose_backend` when the command line
does not name one).  This module holds the pieces that make those processes
agree:

* :class:`ShardedBatchSampler`: every epoch, each training item goes to
  exactly one rank (no overlap, nothing dropped), every rank gets the same
  number of batches (a rank with one batch more would wait forever in DDP's
  gradient all-reduce), and no batch holds fewer than 2 items (BatchNorm's
  minimum in training);
* :func:`sync_batchnorm_supported`: SyncBatchNorm only runs on CUDA tensors
  with NCCL; elsewhere BatchNorm keeps per-rank statistics (DDP broadcasts
  rank 0's running statistics at every forward, so the evaluated model is
  the same on every rank);
* :func:`gather_rows`: the batch of every rank, with gradient, for a
  prototype matrix sharded by class
  (:class:`~spkver.losses.StreamingSparseHead` with a ``process_group``),
  and that head's other collectives: :func:`shard_range` (which classes a
  rank holds), :func:`gather_columns`, :func:`sum_across_ranks`,
  :func:`sum_gradient_across_ranks` and :func:`all_reduce`;
* :func:`all_reduce_sum`: sums of statistics (A3M-I's class means, the
  epoch's counters) over the ranks;
* :func:`save_sharded_rows` / :func:`load_sharded_rows`: a checkpoint of a
  sharded prototype matrix (and its optimiser state) holds the whole
  matrix, written by rank 0, so it loads under another sharding and in a
  single process (averaging, export, fine-tuning).

Every function is a no-op, or the identity, outside an initialised process
group, so the single-process path is the same code.  This module is the one
room for collectives: it imports only the standard library and torch, so
that any module of spkver can use it.

>>> sampler = ShardedBatchSampler(10, batch_size=2, world_size=2, rank=0, seed=0)
>>> sorted(i for batch in sampler for i in batch) == sorted(
...     set(range(10)) - {i for b in ShardedBatchSampler(10, 2, 2, 1, 0) for i in b})
True
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["is_distributed", "world_size", "rank", "choose_backend", "sync_batchnorm_supported",
           "ShardedBatchSampler", "gather_rows", "all_reduce_sum", "all_reduce", "barrier", "shard_range",
           "gather_columns", "sum_across_ranks", "sum_gradient_across_ranks", "save_sharded_rows",
           "load_sharded_rows"]


def is_distributed() -> bool:
    """Whether a process group is initialised (the process was launched by ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def choose_backend(run_opts, cuda_available: Optional[bool] = None):
    """``(run_opts, note)``: gloo on the CPU when no backend was asked for and there is no GPU.

    SpeechBrain defaults to NCCL, which stops a CPU launch with "Not enough
    GPUs available!".  A ``--distributed_backend`` on the command line (in
    SpeechBrain's ``RunOptions.overridden_args``) is left alone, as is a
    machine with a GPU; then ``note`` is ``None``, else the line to log.
    ``RunOptions`` is a frozen dataclass: a changed copy is returned.
    """
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if "distributed_backend" in run_opts.overridden_args or cuda_available:
        return run_opts, None
    changes = {"distributed_backend": "gloo", "device": "cpu"}
    # SpeechBrain's Brain takes only the options listed as overridden from run_opts.
    run_opts = dataclasses.replace(run_opts, **changes, overridden_args=set(run_opts.overridden_args) | set(changes))
    return run_opts, "no GPU: DDP over gloo on the CPU (--distributed_backend=nccl|gloo to choose)"


def sync_batchnorm_supported(backend: str, device) -> bool:
    """SyncBatchNorm needs CUDA tensors and NCCL; with anything else BatchNorm stays per rank."""
    return backend == "nccl" and torch.device(device).type == "cuda"


class ShardedBatchSampler:
    """Batches of item indices for one rank: every item of the epoch exactly once across the ranks.

    Each epoch (``set_epoch``) the items are shuffled with ``seed + epoch`` (the
    same order on every rank) and cut into global batches of ``world_size *
    batch_size``; a rank takes every ``world_size``-th item of each.  A last
    global batch too small to give every rank 2 items is merged into the one
    before it, so batches hold ``batch_size`` items, a few more (the last), or
    fewer (a last batch split evenly), never fewer than 2; every rank has the
    same number of batches.

    >>> [len(b) for b in ShardedBatchSampler(21, batch_size=4, world_size=2, rank=1, seed=0)]
    [4, 4, 2]
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int, rank: int, seed: int = 0,
                 shuffle: bool = True):
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (BatchNorm needs 2 items per batch), got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size - 1}], got {rank}")
        if num_items < 2 * world_size:
            raise ValueError(f"{num_items} training items cannot give each of {world_size} ranks a batch of "
                             "2 (BatchNorm's minimum)")
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.world_size, self.rank, self.seed, self.shuffle = int(world_size), int(rank), int(seed), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order to draw (SpeechBrain calls it at the start of each)."""
        self.epoch = int(epoch)

    def _global_batches(self) -> List[torch.Tensor]:
        if self.shuffle:  # the same order on every rank: a generator seeded by (seed, epoch)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        step = self.world_size * self.batch_size
        batches = list(order.split(step))
        if len(batches) > 1 and len(batches[-1]) < 2 * self.world_size:
            batches[-2:] = [torch.cat(batches[-2:])]
        return batches

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self._global_batches():
            yield batch[self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        return len(self._global_batches())


def _all_gather_uneven(local: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """The ranks' ``local`` tensors of ``sizes[r]`` rows each, concatenated in rank order."""
    padded = torch.zeros((max(sizes),) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather (B_r, D) rows of every rank (B_r may differ); the gradient is this rank's slice, times
    the world size, so that DDP's averaging of the extractor's gradients gives the gradient of the loss
    of the gathered batch (which every rank computes whole)."""

    @staticmethod
    def forward(ctx, local, sizes, group):
        ctx.rank, ctx.sizes, ctx.world = dist.get_rank(group), sizes, len(sizes)
        return _all_gather_uneven(local.detach(), sizes, group)

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]] * ctx.world, None, None


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's rows in rank order (``local`` itself outside DDP); see :class:`_GatherRows`.

    Integer tensors (targets) are gathered without gradient.
    """
    if not is_distributed():
        return local
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    if not local.is_floating_point():
        return _all_gather_uneven(local, sizes, group)
    return _GatherRows.apply(local, sizes, group)


class _GatherColumns(torch.autograd.Function):
    """All-gather (B, k) columns from every rank; the gradient keeps this rank's slice.

    Every rank computes the same loss from the gathered columns, so the
    gradient each rank receives is already complete: no reduction is needed.
    """

    @staticmethod
    def forward(ctx, local, group):
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, local.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), local.shape[1]
        return torch.cat(pieces, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward (each rank holds the complete gradient)."""

    @staticmethod
    def forward(ctx, value, group):
        value = value.clone()
        dist.all_reduce(value, group=group)
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumGradientAcrossRanks(torch.autograd.Function):
    """Identity forward; backward sums the partial embedding gradients of all ranks' shards."""

    @staticmethod
    def forward(ctx, value, group):
        ctx.group = group
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def shard_range(num_classes: int, world_size: int, rank: int) -> Tuple[int, int]:
    """The contiguous class range ``[start, stop)`` that ``rank`` holds.

    >>> [shard_range(10, 3, r) for r in range(3)]
    [(0, 4), (4, 8), (8, 10)]
    """
    per_rank = -(-num_classes // world_size)
    start = min(rank * per_rank, num_classes)
    return start, min(start + per_rank, num_classes)


def gather_columns(local: torch.Tensor, group) -> torch.Tensor:
    """Every rank's (B, k) columns side by side; the gradient keeps this rank's slice (:class:`_GatherColumns`)."""
    return _GatherColumns.apply(local, group)


def sum_across_ranks(value: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``value`` over the ranks; the gradient passes through unchanged (:class:`_SumAcrossRanks`)."""
    return _SumAcrossRanks.apply(value, group)


def sum_gradient_across_ranks(value: torch.Tensor, group) -> torch.Tensor:
    """``value`` itself; its gradient summed over the ranks (:class:`_SumGradientAcrossRanks`)."""
    return _SumGradientAcrossRanks.apply(value, group)


def all_reduce(value: torch.Tensor, op, group) -> torch.Tensor:
    """``value`` reduced in place by ``op`` over ``group`` (a no-op without a group); returns it."""
    if group is not None:
        dist.all_reduce(value, op=op, group=group)
    return value


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (nothing outside DDP); NCCL's through the GPU."""
    if not is_distributed():
        return
    via_gpu = dist.get_backend() == "nccl"
    for tensor in tensors:
        if via_gpu and tensor.device.type != "cuda":
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def _gather_shards(local: torch.Tensor, num_rows: int) -> Optional[torch.Tensor]:
    """The (num_rows, ...) matrix of the ranks' contiguous row shards, on rank 0 (``None`` elsewhere)."""
    world = dist.get_world_size()
    sizes = [stop - start for start, stop in (shard_range(num_rows, world, r) for r in range(world))]
    whole = _all_gather_uneven(local, sizes, group=None)
    return whole.cpu() if dist.get_rank() == 0 else None


def save_sharded_rows(head, optimizer: Optional[torch.optim.Optimizer], path) -> None:
    """Checkpoint hook for a class-sharded head: the whole prototype matrix, or (``optimizer``
    given) the optimiser's state with the whole matrix's momentum, gathered from every rank and
    written by rank 0.

    Every rank must call it (SpeechBrain runs custom save hooks on every rank).
    """
    if optimizer is None:
        full = {"weight": _gather_shards(head.weight.detach(), head.num_classes)}
    else:
        full = _gathered_optimizer_state(head, optimizer)
    if rank() == 0:
        torch.save(full, path)


def _gathered_optimizer_state(head, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with the sharded prototypes' per-row state (momentum) made whole."""
    state = optimizer.state_dict()
    parameter = head.weight
    index = _parameter_index(optimizer, parameter)
    # A copy: the optimiser's state_dict() shares its per-parameter dicts with the optimiser itself.
    per_parameter = dict(state["state"].get(index, {}))
    for key, value in sorted(per_parameter.items()):
        if torch.is_tensor(value) and value.shape[:1] == parameter.shape[:1] and value.dim() == parameter.dim():
            per_parameter[key] = _gather_shards(value, head.num_classes)
    return {**state, "state": {**state["state"], index: per_parameter}}


def _parameter_index(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> int:
    """The index ``optimizer.state_dict()`` gives ``parameter``."""
    index = 0
    for group in optimizer.param_groups:
        for candidate in group["params"]:
            if candidate is parameter:
                return index
            index += 1
    raise ValueError("the optimiser does not train the sharded prototypes")


def load_sharded_rows(head, optimizer: Optional[torch.optim.Optimizer], path) -> None:
    """Load a checkpoint written by :func:`save_sharded_rows`: each rank keeps its own rows."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never runs code from the file
    start, stop = head.class_offset, head.class_offset + head.weight.shape[0]
    if optimizer is None:
        weight = state["weight"]
        if weight.shape[0] != head.num_classes or weight.shape[1:] != head.weight.shape[1:]:
            raise ValueError(f"{path}: prototypes of shape {tuple(weight.shape)}, the head has "
                             f"({head.num_classes}, {head.weight.shape[1]})")
        with torch.no_grad():
            head.weight.copy_(weight[start:stop])
        return
    index = _parameter_index(optimizer, head.weight)
    for key, value in state["state"].get(index, {}).items():
        if torch.is_tensor(value) and value.dim() == head.weight.dim() and value.shape[0] == head.num_classes:
            state["state"][index][key] = value[start:stop].clone()
    optimizer.load_state_dict(state)
