r"""An exact alpha-divergence margin head for very many classes, without (B, C) logits.

For :math:`\alpha > 1` a class can only carry probability if its logit is within
:math:`1/(\alpha-1)` of :math:`\tau`, and :math:`\tau \ge \tau_{lo} =
\max(b_y, \max_{j \ne y}\theta_j)` (see :mod:`spkver.losses.operator`).  The head

1. streams the prototype matrix in chunks of ``chunk_size`` classes, keeping each
   row's top-``k`` non-target logits (no gradient, four kernel launches per
   chunk, memory :math:`O(B \cdot (8k + \text{chunk}))`);
2. **certifies** every row: its smallest kept logit lies below
   :math:`\tau_{lo} - 1/(\alpha-1)`, or, where that fails, below
   :math:`\tau_K - 1/(\alpha-1)` with :math:`\tau_K \ge \tau_{lo}` the root on the
   kept classes and the target (a lower bound of the full root: a subset has
   less mass), so every class it did not keep has :math:`p_j = 0` exactly;
   rows that fail both are streamed again with a larger ``k``;
3. recomputes the logits of the kept classes and the target *with* gradient,
   from prototype rows gathered in one sparse embedding lookup, and applies the
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
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spkver import distributed
from spkver.losses.checks import LossInputError, check_targets
from spkver.losses.engines import check_engine_name
from spkver.losses.objectives import CosineMarginObjective
from spkver.losses.softargmax import CERTIFICATE_SLACK, solve_alpha_softargmax

__all__ = ["StreamingSparseHead"]


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


class StreamingSparseHead(nn.Module):
    """Prototypes ``weight`` (C, D) and an exact sparse alpha-divergence objective over them.

    Parameters
    ----------
    num_classes, embedding_dim : int
    objective : CosineMarginObjective
        An alpha-divergence objective with ``alpha > 1`` (AlphaDiv, QMargin, A3M).
    chunk_size : int, optional
        Classes scored at a time while streaming.  By default as many as make
        a (batch, chunk) block of ``BLOCK_ELEMENTS`` = 2**24 cosines (64 MiB in
        float32; 32,768 classes at B = 512), so that the stream's temporaries
        are bounded whatever the batch: larger blocks mean fewer kernel
        launches (on a GPU a small chunk makes the stream host-bound), smaller
        ones less memory.
    candidates : int
        Initial top-k kept per row; grows by itself when a certificate fails.
    sparse_gradient : bool
        The prototype gradient as a sparse tensor over the touched rows (for
        ``torch.optim.SGD`` without momentum or ``torch.optim.SparseAdam``:
        memory :math:`O(B k D)`), or as a dense (C, D) tensor that any
        optimiser takes (the recipe's SGD with momentum): still no (B, C)
        logits or logit gradients.
    process_group : torch.distributed group, optional
        Shard the prototypes by class over this group (model parallel, as
        Partial FC does): each rank holds a contiguous range of classes
        (``class_offset``), streams only its shard, and the candidates are
        merged across ranks.  Every rank must pass the same embeddings and
        targets (all-gather the batch first); the embedding gradient comes back
        complete on every rank, the prototype gradient for the local shard.
    engine : {"auto", "triton", "cpu", "dense", "torch"}, optional
        The loss engine of the objective's call on the kept columns
        (:mod:`spkver.losses.engines`); ``None``: the objective's own ``engine``.

    Examples
    --------
    >>> from spkver.losses import QMargin
    >>> head = StreamingSparseHead(1000, 16, QMargin(30.0, 0.2, 1.5), chunk_size=256)
    >>> loss = head(torch.randn(4, 16), torch.tensor([0, 5, 999, 3]))
    >>> loss.backward(); head.weight.grad.is_sparse
    True

    After a call, ``last_correct`` (B,) says which rows' target cosine exceeds
    every other class's (the classification accuracy, without (B, C) scores).
    """

    BLOCK_ELEMENTS = 1 << 24  # cosines per streamed block when chunk_size is not given
    MERGE_EVERY = 8  # chunks' top-k kept side by side before they are merged

    @staticmethod
    def check_objective(objective: CosineMarginObjective) -> None:
        """Raise a ``ValueError`` (:class:`~spkver.losses.checks.LossInputError`) unless the head can be exact
        for ``objective`` (it needs alpha > 1)."""
        if objective.alpha <= 1.0:
            raise LossInputError("the sparse head needs alpha > 1 (softmax posteriors are dense); "
                             f"got {type(objective).__name__} with alpha={objective.alpha}")

    def __init__(self, num_classes: int, embedding_dim: int, objective: CosineMarginObjective,
                 chunk_size: Optional[int] = None, candidates: int = 32, sparse_gradient: bool = True,
                 process_group=None, engine: Optional[str] = None):
        super().__init__()
        self.check_objective(objective)
        if (chunk_size is not None and chunk_size < 1) or candidates < 1:
            raise LossInputError(f"chunk_size and candidates must be >= 1, got {chunk_size} and {candidates}")
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group) if process_group is not None else 1
        rank = dist.get_rank(process_group) if process_group is not None else 0
        self.class_offset, stop = distributed.shard_range(num_classes, self.world_size, rank)
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(stop - self.class_offset, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.objective = objective
        self.chunk_size = chunk_size
        self.candidates = candidates
        self.sparse_gradient = sparse_gradient
        self.engine = None if engine is None else check_engine_name(engine)
        self.restreams = 0  # how often a certificate failed (for diagnostics)
        self.last_correct: Optional[torch.Tensor] = None

    def classes_per_chunk(self, batch: int) -> int:
        """``chunk_size``, or by default as many classes as fill a (batch, chunk) block of
        :attr:`BLOCK_ELEMENTS` cosines."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, self.BLOCK_ELEMENTS // max(batch, 1))

    def _all_reduce(self, value, op):
        return distributed.all_reduce(value, op, self.process_group)

    def _agreed(self, width: int, device) -> int:
        """The largest of the ranks' ``width`` (a tensor on ``device``: NCCL reduces only GPU tensors)."""
        return int(self._all_reduce(torch.tensor(width, device=device), dist.ReduceOp.MAX))

    @torch.no_grad()
    def _top_candidates(self, unit: torch.Tensor, targets: torch.Tensor, k: int):
        """Each row's top-``k`` non-target cosines (B, k) and their classes, streaming the prototypes.

        A chunk costs three launches (four past the first): its product with
        the unit embeddings, the division by its prototypes' norms (computed
        once for the shard), a top-(k+1) and the shift of its class indices;
        every :attr:`MERGE_EVERY` chunks the kept top-(k+1) are merged.  The
        target is not masked while streaming: the top-(k+1) of all classes
        holds the top-k non-target ones, picked once at the end (a target of
        -1 leaves nothing out).  Past a shard's classes the slots are -inf.
        """
        weight = self.weight.detach()
        classes = weight.shape[0]
        chunk = self.classes_per_chunk(unit.shape[0])
        norms = weight.norm(dim=1).clamp_min_(_GatheredCosine.EPS)
        kept = []  # (values, class indices) of the chunks since the last merge
        for start in range(0, classes, chunk):
            cosine = (unit @ weight[start:start + chunk].T).div_(norms[start:start + chunk])
            values, index = cosine.topk(min(k + 1, cosine.shape[1]), dim=1)
            kept.append((values, index + start if start else index))
            if len(kept) > self.MERGE_EVERY:
                kept = [self._merge(kept, k + 1)]
        values, index = kept[0] if len(kept) == 1 else self._merge(kept, k + 1)
        values = values.masked_fill(index == targets[:, None], -math.inf)
        if values.shape[1] < k:  # a shard of fewer than k classes
            values = F.pad(values, (0, k - values.shape[1]), value=-math.inf)
            index = F.pad(index, (0, k - index.shape[1]))
        best, where = values.topk(k, dim=1)
        return best, index.gather(1, where)

    def _kept_root(self, logits: torch.Tensor, target_logit: torch.Tensor, log_q_y: Optional[float]) -> torch.Tensor:
        """The root tau (B,) of the f-softargmax on the kept logits (B, k) and the target's logit (B,)."""
        logits = torch.cat([logits, target_logit[:, None]], dim=1)
        last = torch.full((logits.shape[0],), logits.shape[1] - 1, dtype=torch.long, device=logits.device)
        log_q = None if log_q_y is None else torch.full_like(target_logit, log_q_y)
        row_max = logits.amax(1)
        rows = solve_alpha_softargmax(logits, self.objective.alpha, targets=last, log_q_target=log_q,
                                      target_logits=target_logit, row_max=row_max, candidates_hint=logits.shape[1])
        return rows.tau + row_max

    @staticmethod
    def _merge(kept, width: int):
        """The top ``width`` of the kept chunks' candidates, with their class indices."""
        values = torch.cat([v for v, _ in kept], dim=1)
        index = torch.cat([i for _, i in kept], dim=1)
        values, where = values.topk(min(width, values.shape[1]), dim=1)
        return values, index.gather(1, where)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        objective = self.objective
        if embeddings.dim() != 2 or embeddings.shape[1] != self.weight.shape[1]:
            raise LossInputError(f"embeddings must have shape (batch, {self.weight.shape[1]}), "
                             f"got {tuple(embeddings.shape)}")
        targets = check_targets(targets, embeddings)
        sharded = self.process_group is not None
        # The targets' range is read back with the certificate (one device sync for both).
        extremes = torch.stack(torch.aminmax(targets))
        if sharded:
            embeddings = distributed.sum_gradient_across_ranks(embeddings, self.process_group)
        unit = F.normalize(embeddings, dim=1)
        local_classes = self.weight.shape[0]
        if sharded:  # the target's row is on the rank that holds its class; -1 streams with no target
            local_targets = targets - self.class_offset
            owned = (local_targets >= 0) & (local_targets < local_classes)
            stream_targets = torch.where(owned, local_targets, torch.full_like(local_targets, -1))
        else:
            local_targets = stream_targets = targets
        safe_targets = local_targets.clamp(0, max(local_classes - 1, 0))  # a safe lookup until the check
        scale, reach = objective.scale, 1.0 / (objective.alpha - 1.0)
        log_q_y = objective.target_log_q()
        k = max(1, min(self.candidates, local_classes))
        if sharded:  # every rank must gather the same width
            k = self._agreed(k, unit.device)
        best, index = self._top_candidates(unit.detach(), stream_targets, k)
        padded = sharded or k >= local_classes - 1  # whether some kept slots can be padding (-inf)
        while True:
            # The kept classes' and the target's cosines, with gradient, from one sparse lookup.
            rows = F.embedding(torch.cat([index, safe_targets[:, None]], dim=1), self.weight,
                               sparse=self.sparse_gradient)
            cosine = _GatheredCosine.apply(rows, unit)
            target_cosine = cosine[:, -1]
            if sharded:
                target_cosine = torch.where(owned, target_cosine, torch.zeros_like(target_cosine))
                target_cosine = distributed.sum_across_ranks(target_cosine, self.process_group)
            with torch.no_grad():
                top = self._all_reduce(best[:, 0].clone(), dist.ReduceOp.MAX) if sharded else best[:, 0]
                target_logit = scale * objective.target_cosine(target_cosine.detach())
                tau_lo = torch.maximum(scale * top, objective.target_bound(target_logit))
                # A row is certified when its smallest kept logit is out of reach (a padding slot is -inf),
                # or when this rank kept every class it holds: nothing was left out to certify (a shard
                # of k classes or fewer would otherwise fail forever, however wide the stream).
                failed = scale * best[:, -1] >= tau_lo - reach
                if k >= local_classes:
                    failed = torch.zeros_like(failed)
                if sharded:  # a row that fails on any rank is redone on every rank
                    failed = self._all_reduce(failed.to(torch.int32), dist.ReduceOp.MAX).bool()
                lowest, highest, failures = torch.cat([extremes, failed.sum()[None]]).tolist()
            if lowest < 0 or highest >= self.num_classes:
                bad = lowest if lowest < 0 else highest
                raise LossInputError(f"targets must lie in [0, {self.num_classes - 1}], got {bad}")
            if failures:
                with torch.no_grad():
                    # Where that bound fails: the root on the kept classes and the target is a lower
                    # bound of the full root too (a subset has less mass), far tighter when many
                    # classes crowd the top of a row (the start of training). The ranks' bounds
                    # agree on their largest.
                    tau = self._kept_root(scale * best, target_logit, log_q_y)
                    if sharded:
                        tau = self._all_reduce(tau, dist.ReduceOp.MAX)
                    failed &= scale * best[:, -1] >= tau - reach - CERTIFICATE_SLACK
                    if sharded:
                        failed = self._all_reduce(failed.to(torch.int32), dist.ReduceOp.MAX).bool()
                    failures = int(failed.sum())
            if not failures:
                break
            # Redo only the failed rows, with 4x the candidates; the other rows' new slots are padding.
            self.restreams += 1
            wider = min(4 * k, max(local_classes, 1))
            if sharded:
                wider = self._agreed(wider, unit.device)
            redo = failed.nonzero().squeeze(1)
            more_best, more_index = self._top_candidates(unit.detach()[redo], stream_targets[redo], wider)
            best = F.pad(best, (0, wider - k), value=-math.inf).index_copy_(0, redo, more_best)
            index = F.pad(index, (0, wider - k)).index_copy_(0, redo, more_index)
            k, padded = wider, True
        self.candidates = max(self.candidates, k)
        self.last_correct = target_cosine.detach() > top
        if sharded:
            # Padding slots are masked out; the columns of all ranks are gathered, and the target's
            # summed cosine goes last.
            kept = cosine[:, :-1].masked_fill(best == -math.inf, -math.inf)
            columns = torch.cat([distributed.gather_columns(kept, self.process_group), target_cosine[:, None]], dim=1)
        elif padded:
            columns = cosine.masked_fill(F.pad(best == -math.inf, (0, 1)), -math.inf)
        else:
            columns = cosine  # the kept classes, then the target
        return objective(columns, torch.full_like(targets, columns.shape[1] - 1), engine=self.engine)
