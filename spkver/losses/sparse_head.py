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
import torch.nn.functional as F
from torch import nn

from spkver.losses.objectives import CosineMarginObjective
from spkver.losses.operator import check_targets

__all__ = ["StreamingSparseHead"]


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

    Examples
    --------
    >>> from spkver.losses import QMargin
    >>> head = StreamingSparseHead(1000, 16, QMargin(30.0, 0.2, 1.5), chunk_size=256)
    >>> loss = head(torch.randn(4, 16), torch.tensor([0, 5, 999, 3]))
    >>> loss.backward(); head.weight.grad.is_sparse
    True
    """

    def __init__(self, num_classes: int, embedding_dim: int, objective: CosineMarginObjective,
                 chunk_size: int = 8192, candidates: int = 32):
        super().__init__()
        if objective.alpha <= 1.0:
            raise ValueError("the sparse head needs alpha > 1 (softmax posteriors are dense); "
                             f"got {type(objective).__name__} with alpha={objective.alpha}")
        if chunk_size < 1 or candidates < 1:
            raise ValueError(f"chunk_size and candidates must be >= 1, got {chunk_size} and {candidates}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.objective = objective
        self.chunk_size = chunk_size
        self.candidates = candidates
        self.restreams = 0  # how often a certificate failed (for diagnostics)

    @torch.no_grad()
    def _top_candidates(self, unit: torch.Tensor, targets: torch.Tensor, k: int):
        """Each row's top-``k`` non-target cosines and their classes, streaming the prototypes."""
        batch = unit.shape[0]
        best = unit.new_full((batch, k), -math.inf)
        index = torch.zeros(batch, k, dtype=torch.long, device=unit.device)
        for start in range(0, self.weight.shape[0], self.chunk_size):
            chunk = F.normalize(self.weight[start:start + self.chunk_size].detach(), dim=1)
            cosine = unit @ chunk.T
            local = targets - start
            inside = (local >= 0) & (local < chunk.shape[0])
            if bool(inside.any()):
                rows = inside.nonzero().squeeze(1)
                cosine[rows, local[rows]] = -math.inf  # the target is handled separately
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
        classes = self.weight.shape[0]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            raise ValueError(f"targets must lie in [0, {classes - 1}]")
        unit = F.normalize(embeddings, dim=1)
        scale, reach = objective.scale, 1.0 / (objective.alpha - 1.0)
        with torch.no_grad():
            target_rows = F.normalize(self.weight[targets].detach(), dim=1)
            target_logit = scale * objective.target_cosine((unit.detach() * target_rows).sum(1))
            log_q_y = objective.target_log_q()
            bound_y = target_logit if log_q_y is None else \
                target_logit - math.expm1((1.0 - objective.alpha) * log_q_y) / (objective.alpha - 1.0)
        k = min(self.candidates, classes - 1) if classes > 1 else 0
        while True:
            if k == 0:
                index = targets.new_zeros(targets.shape[0], 0)
                break
            best, index = self._top_candidates(unit.detach(), targets, k)
            tau_lo = torch.maximum(scale * best[:, 0], bound_y)
            smallest = scale * best[:, -1]
            if k >= classes - 1 or bool((smallest < tau_lo - reach).all()):
                break  # certified: every class left out has p_j = 0
            self.restreams += 1
            k = min(4 * k, classes - 1)
        self.candidates = max(self.candidates, k)
        # Gradient-carrying logits of the kept classes (target last), through a sparse lookup.
        columns = torch.cat([index, targets[:, None]], dim=1)
        prototypes = F.normalize(F.embedding(columns, self.weight, sparse=True), dim=2)
        cosine = (prototypes * unit[:, None, :]).sum(2)
        local_targets = torch.full_like(targets, columns.shape[1] - 1)
        return objective(cosine, local_targets)
