r"""An exact alpha-divergence margin head for very many classes, without (B, C) logits.

For :math:`\alpha > 1` a class can only carry probability if its logit is within
:math:`1/(\alpha-1)` of :math:`\tau`, and :math:`\tau \ge \tau_{lo} =
\max(b_y, \max_{j \ne y}\theta_j)` (see :mod:`spkver.losses.operator`).  The head

1. streams the prototype matrix in chunks of ``chunk_size`` classes, keeping each
   row's top-``k`` non-target logits (no gradient, memory :math:`O(B \cdot
   (k + \text{chunk}))`);
2. **certifies** every row: its smallest kept logit lies below
   :math:`\tau_{lo} - 1/(\alpha-1)`, so every class it did not keep has
   :math:`p_j = 0` exactly; rows that fail are streamed again with a larger ``k``;
3. recomputes the logits of the kept classes and the target *with* gradient,
   from prototype rows gathered as a sparse embedding lookup, and applies the
   objective (:class:`~spkver.losses.AlphaDiv`, :class:`~spkver.losses.QMargin`
   or :class:`~spkver.losses.A3M`) to those :math:`k + 1` columns.

Loss and gradients equal the dense objective's (the classes left out have
:math:`p_j = 0` and contribute nothing), but the prototype gradient is a
sparse tensor over the touched rows only, so memory is :math:`O(C D + B k)`:
train the prototypes with an optimiser that accepts sparse gradients
(``torch.optim.SGD`` without momentum, ``torch.optim.SparseAdam``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spkver.losses.objectives import CosineMarginObjective
from spkver.losses.operator import check_targets

__all__ = ["StreamingSparseHead", "shard_range"]


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


class _GatheredCosine(torch.autograd.Function):
    r"""Cosines :math:`\cos_{bk} = g_{bk} \cdot u_b / \lVert g_{bk} \rVert` of gathered prototype rows.

    ``rows`` (B, K, D) are prototypes gathered per batch row, ``unit`` (B, D)
    unit embeddings.  The same values and gradients as
    ``(F.normalize(rows, dim=2) * unit[:, None]).sum(2)``, without its
    (B, K, D) temporaries: the backward pass writes the one (B, K, D) gradient
    the sparse prototype update needs,

    .. math::
        \frac{\partial \cos_{bk}}{\partial g_{bk}} = \frac{u_b - \cos_{bk}\, g_{bk} / \lVert g_{bk}\rVert}
        {\lVert g_{bk}\rVert}, \qquad
        \frac{\partial \cos_{bk}}{\partial u_b} = \frac{g_{bk}}{\lVert g_{bk}\rVert}.
    """

    EPS = 1e-12  # F.normalize's

    @staticmethod
    def forward(ctx, rows, unit):
        norms = rows.norm(dim=2)
        clamped = norms.clamp_min(_GatheredCosine.EPS)
        cosine = torch.bmm(rows, unit[:, :, None]).squeeze(2) / clamped
        ctx.save_for_backward(rows, unit, norms, clamped, cosine)
        return cosine

    @staticmethod
    def backward(ctx, grad):
        rows, unit, norms, clamped, cosine = ctx.saved_tensors
        scaled = grad / clamped
        grad_unit = torch.bmm(scaled[:, None, :], rows).squeeze(1)
        # The norm's own derivative vanishes where F.normalize clamps it.
        radial = torch.where(norms >= _GatheredCosine.EPS, scaled * cosine / clamped, torch.zeros_like(scaled))
        grad_rows = torch.bmm(scaled[:, :, None], unit[:, None, :]).sub_(rows * radial[:, :, None])
        return grad_rows, grad_unit


def shard_range(num_classes: int, world_size: int, rank: int):
    """The contiguous class range ``[start, stop)`` that ``rank`` holds."""
    per_rank = -(-num_classes // world_size)
    start = min(rank * per_rank, num_classes)
    return start, min(start + per_rank, num_classes)


class StreamingSparseHead(nn.Module):
    """Prototypes ``weight`` (C, D) and an exact sparse alpha-divergence objective over them.

    Parameters
    ----------
    num_classes, embedding_dim : int
    objective : CosineMarginObjective
        An alpha-divergence objective with ``alpha > 1`` (AlphaDiv, QMargin, A3M).
    chunk_size : int
        Classes scored at a time while streaming.
    candidates : int
        Initial top-k kept per row; grows by itself when a certificate fails.
    process_group : torch.distributed group, optional
        Shard the prototypes by class over this group (model parallel, as
        Partial FC does): each rank holds a contiguous range of classes
        (``class_offset``), streams only its shard, and the candidates are
        merged across ranks.  Every rank must pass the same embeddings and
        targets (all-gather the batch first); the embedding gradient comes back
        complete on every rank, the prototype gradient for the local shard.

    Examples
    --------
    >>> from spkver.losses import QMargin
    >>> head = StreamingSparseHead(1000, 16, QMargin(30.0, 0.2, 1.5), chunk_size=256)
    >>> loss = head(torch.randn(4, 16), torch.tensor([0, 5, 999, 3]))
    >>> loss.backward(); head.weight.grad.is_sparse
    True
    """

    def __init__(self, num_classes: int, embedding_dim: int, objective: CosineMarginObjective,
                 chunk_size: int = 8192, candidates: int = 32, process_group=None):
        super().__init__()
        if objective.alpha <= 1.0:
            raise ValueError("the sparse head needs alpha > 1 (softmax posteriors are dense); "
                             f"got {type(objective).__name__} with alpha={objective.alpha}")
        if chunk_size < 1 or candidates < 1:
            raise ValueError(f"chunk_size and candidates must be >= 1, got {chunk_size} and {candidates}")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if process_group is not None else 1
        rank = dist.get_rank(process_group) if process_group is not None else 0
        self.class_offset, stop = shard_range(num_classes, self.world_size, rank)
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(stop - self.class_offset, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.objective = objective
        self.chunk_size = chunk_size
        self.candidates = candidates
        self.restreams = 0  # how often a certificate failed (for diagnostics)

    def _all_reduce(self, value, op):
        if self.process_group is not None:
            dist.all_reduce(value, op=op, group=self.process_group)
        return value

    @torch.no_grad()
    def _top_candidates(self, unit: torch.Tensor, targets: torch.Tensor, k: int):
        """Each row's top-``k`` non-target cosines and their classes, streaming the prototypes."""
        batch = unit.shape[0]
        best = unit.new_full((batch, k), -math.inf)
        index = torch.zeros(batch, k, dtype=torch.long, device=unit.device)
        for start in range(0, self.weight.shape[0], self.chunk_size):
            chunk = F.normalize(self.weight[start:start + self.chunk_size].detach(), dim=1)
            cosine = unit @ chunk.T
            # The target is handled separately: mask it where it falls in this chunk (no device sync).
            local = targets - start
            inside = (local >= 0) & (local < chunk.shape[0])
            column = local.clamp(0, chunk.shape[0] - 1)[:, None]
            cosine.scatter_(1, column, cosine.gather(1, column).masked_fill(inside[:, None], -math.inf))
            # Top-k of the chunk first, then merge with the running top-k: temporaries stay (B, chunk).
            chunk_best, chunk_index = cosine.topk(min(k, cosine.shape[1]), dim=1)
            merged = torch.cat([best, chunk_best], dim=1)
            best, where = merged.topk(k, dim=1)
            index = torch.cat([index, chunk_index + start], dim=1).gather(1, where)
        return best, index

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        objective = self.objective
        if embeddings.dim() != 2 or embeddings.shape[1] != self.weight.shape[1]:
            raise ValueError(f"embeddings must have shape (batch, {self.weight.shape[1]}), "
                             f"got {tuple(embeddings.shape)}")
        targets = check_targets(targets, embeddings)
        # Checked at the certificate's read-back (one device sync for both); harmless until then.
        out_of_range = ((targets < 0) | (targets >= self.num_classes)).any()
        if self.process_group is not None:
            embeddings = _SumGradientAcrossRanks.apply(embeddings, self.process_group)
        unit = F.normalize(embeddings, dim=1)
        local_classes = self.weight.shape[0]
        local_targets = targets - self.class_offset
        owned = (local_targets >= 0) & (local_targets < local_classes)
        safe_targets = local_targets.clamp(0, max(local_classes - 1, 0))
        scale, reach = objective.scale, 1.0 / (objective.alpha - 1.0)
        # The target's cosine, with gradient, from the rank that holds it (a sparse lookup).
        target_rows = F.embedding(safe_targets[:, None], self.weight, sparse=True)
        target_cosine = torch.where(owned, _GatheredCosine.apply(target_rows, unit).squeeze(1),
                                    torch.zeros_like(unit[:, 0]))
        if self.process_group is not None:
            target_cosine = _SumAcrossRanks.apply(target_cosine, self.process_group)
        with torch.no_grad():  # the target's logit and bound
            target_logit = scale * objective.target_cosine(target_cosine.detach())
            log_q_y = objective.target_log_q()
            bound_y = target_logit if log_q_y is None else \
                target_logit - math.expm1((1.0 - objective.alpha) * log_q_y) / (objective.alpha - 1.0)
        stream_targets = torch.where(owned, local_targets, torch.full_like(local_targets, -1))
        k = max(1, min(self.candidates, local_classes))
        while True:
            best, index = self._top_candidates(unit.detach(), stream_targets, k)
            with torch.no_grad():
                top = self._all_reduce(best[:, 0].clone(), dist.ReduceOp.MAX)
                tau_lo = torch.maximum(scale * top, bound_y)
                # Certified when a kept logit is out of reach, or the shard has no class left out.
                certified = (scale * best[:, -1] < tau_lo - reach) | torch.tensor(k >= local_classes)
                failed = self._all_reduce((~certified).any().to(torch.int32), dist.ReduceOp.MAX)
                failed, bad_targets = torch.stack([failed, out_of_range.to(torch.int32)]).tolist()
            if bad_targets:
                raise ValueError(f"targets must lie in [0, {self.num_classes - 1}]")
            if not failed:
                break
            self.restreams += 1
            k = min(4 * k, max(local_classes, 1))
            if self.process_group is not None:  # every rank must gather the same width
                width = torch.tensor(k)
                k = int(self._all_reduce(width, dist.ReduceOp.MAX))
        self.candidates = max(self.candidates, k)
        # Gradient-carrying cosines of the kept classes through a sparse lookup; padding slots
        # (a shard with fewer than k classes) are masked out.
        cosine = _GatheredCosine.apply(F.embedding(index, self.weight, sparse=True), unit)
        cosine = cosine.masked_fill(best == -math.inf, -math.inf)
        if self.process_group is not None:
            cosine = _GatherColumns.apply(cosine, self.process_group)
        columns = torch.cat([cosine, target_cosine[:, None]], dim=1)
        return objective(columns, torch.full_like(targets, columns.shape[1] - 1))
