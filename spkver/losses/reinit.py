r"""A3M-I: re-initialising class prototypes to class-mean embeddings.

A3M (ArcFace's margin under a sparse alpha-divergence posterior) often starts
with the target outside the support, :math:`p_y = 0`: the target logit
:math:`s\cos(\phi_y + m)` sits below :math:`\tau - 1/(\alpha-1)`, so only the
constant :math:`-1` on the target logit and the push on the few support classes
remain.  Setting each prototype to the L2-normalised mean of its class's
embeddings puts the target back into the support.

Definition used here (the paper's exact trigger is not public): the
re-initialisation fires at the end of an epoch when that epoch is listed in
``epochs``, or when the fraction of that epoch's training samples with
:math:`p_y = 0` exceeds ``collapse_threshold``; at most ``max_firings`` times and
never within ``cooldown`` epochs of the last firing.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from spkver import distributed
from spkver.losses.checks import LossInputError
from spkver.losses.engines.base import SparsityStatistics

__all__ = ["ClassMeanAccumulator", "reinitialize_prototypes", "ReinitializationPolicy"]


class ClassMeanAccumulator:
    r"""Streaming class means of L2-normalised embeddings, memory :math:`O(C D)`.

    Examples
    --------
    >>> acc = ClassMeanAccumulator(num_classes=2, dim=2)
    >>> acc.update(torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 1.0]]), torch.tensor([0, 1, 1]))
    >>> acc.prototypes()
    tensor([[1., 0.],
            [0., 1.]])
    """

    def __init__(self, num_classes: int, dim: int, device=None):
        if num_classes < 1 or dim < 1:
            raise LossInputError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of embeddings (B, D) with their class labels (B,)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.sums.shape[1]:
            raise LossInputError(
                f"embeddings must have shape (batch, {self.sums.shape[1]}), got {tuple(embeddings.shape)}"
            )
        if labels.shape != (embeddings.shape[0],):
            raise LossInputError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.sums.shape[0]):
            raise LossInputError(f"labels must lie in [0, {self.sums.shape[0] - 1}]")
        if not bool(torch.isfinite(embeddings).all()):
            raise LossInputError("embeddings contain NaN or inf")
        unit = torch.nn.functional.normalize(embeddings.detach().double(), dim=1)
        labels = labels.to(self.counts.device)
        self.sums.index_add_(0, labels, unit.to(self.sums.device))
        self.counts.index_add_(0, labels, torch.ones_like(labels))

    def merge_across_ranks(self) -> None:
        """Sum the sums and counts over the ranks of a process group (nothing outside one)."""
        distributed.all_reduce_sum(self.sums, self.counts)

    def rows(self, start: int, stop: int) -> "ClassMeanAccumulator":
        """The accumulator of classes ``[start, stop)`` (a shard of the prototypes)."""
        part = ClassMeanAccumulator(stop - start, self.sums.shape[1], device=self.sums.device)
        part.sums, part.counts = self.sums[start:stop], self.counts[start:stop]
        return part

    def prototypes(self, fallback: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised class means (C, D) in float32.

        Classes never seen (or whose mean is zero) take the row of ``fallback``;
        without one, they raise a ``ValueError``.
        """
        norms = self.sums.norm(dim=1, keepdim=True)
        empty = (self.counts == 0) | (norms.squeeze(1) == 0)
        means = (self.sums / norms.clamp_min(1e-30)).float()
        if bool(empty.any()):
            if fallback is None:
                missing = empty.nonzero().squeeze(1)[:5].tolist()
                raise LossInputError(
                    f"{int(empty.sum())} classes have no embeddings (first: {missing}); pass fallback="
                )
            means[empty] = fallback.detach().to(means)[empty]
        return means


@torch.no_grad()
def reinitialize_prototypes(
    prototypes: torch.Tensor,
    accumulator: ClassMeanAccumulator,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> int:
    """Overwrite ``prototypes`` (C, D) with the accumulator's class means.

    The optimiser's state for ``prototypes`` (momentum, Adam moments) is
    cleared, since it describes the old prototypes.  Classes without
    embeddings keep their prototype.  Returns the number of classes set.
    """
    if tuple(prototypes.shape) != tuple(accumulator.sums.shape):
        raise LossInputError(
            f"prototypes have shape {tuple(prototypes.shape)} but the accumulator holds "
            f"{tuple(accumulator.sums.shape)}"
        )
    means = accumulator.prototypes(fallback=prototypes)
    prototypes.copy_(means.to(prototypes))
    if optimizer is not None and prototypes in optimizer.state:
        del optimizer.state[prototypes]
    return int((accumulator.counts > 0).sum())


class ReinitializationPolicy:
    """Decides at the end of each epoch whether to fire A3M-I.

    Parameters
    ----------
    epochs : iterable of int
        Epochs (1-based, as SpeechBrain counts them) after which to fire.
    collapse_threshold : float, optional
        Fire when the fraction of the epoch's samples with :math:`p_y = 0`
        exceeds it (e.g. 0.5); ``None`` disables the automatic trigger.
    cooldown : int
        Minimum number of epochs between two firings.
    max_firings : int, optional
        Cap on the number of firings.

    Examples
    --------
    >>> policy = ReinitializationPolicy(collapse_threshold=0.5)
    >>> policy.observe(SparsityStatistics(3.0, target_zero_fraction=0.75, target_prob=0.1), rows=8)
    >>> policy.should_fire(epoch=1)
    True
    >>> policy.should_fire(epoch=2)  # nothing observed since: no evidence of collapse
    False
    """

    def __init__(self, epochs: Iterable[int] = (), collapse_threshold: Optional[float] = None,
                 cooldown: int = 1, max_firings: Optional[int] = None):
        self.epochs = frozenset(int(e) for e in epochs)
        if collapse_threshold is not None and not 0.0 <= collapse_threshold < 1.0:
            raise LossInputError(f"collapse_threshold must lie in [0, 1), got {collapse_threshold!r}")
        if cooldown < 0:
            raise LossInputError(f"cooldown must be >= 0, got {cooldown!r}")
        self.collapse_threshold = collapse_threshold
        self.cooldown = int(cooldown)
        self.max_firings = max_firings
        self.firings: list = []
        self._zero_rows = 0.0
        self._rows = 0

    def observe(self, statistics: SparsityStatistics, rows: int) -> None:
        """Record one training batch of ``rows`` samples."""
        self._zero_rows += statistics.target_zero_fraction * rows
        self._rows += rows

    @property
    def collapse_fraction(self) -> float:
        """Fraction of the samples observed this epoch with :math:`p_y = 0` (0 if none)."""
        return self._zero_rows / self._rows if self._rows else 0.0

    def merge_across_ranks(self) -> None:
        """Pool this epoch's counts over the ranks, so that every rank takes the same decision."""
        if distributed.is_distributed():
            counts = torch.tensor([self._zero_rows, float(self._rows)], dtype=torch.float64)
            distributed.all_reduce_sum(counts)
            self._zero_rows, self._rows = float(counts[0]), int(counts[1])

    def should_fire(self, epoch: int) -> bool:
        """Decide for the epoch that just ended, then start counting the next one."""
        collapsed = self.collapse_threshold is not None and self._rows > 0 \
            and self.collapse_fraction > self.collapse_threshold
        fire = (epoch in self.epochs or collapsed)
        if self.firings and epoch - self.firings[-1] < self.cooldown:
            fire = False
        if self.max_firings is not None and len(self.firings) >= self.max_firings:
            fire = False
        if fire:
            self.firings.append(epoch)
        self._zero_rows, self._rows = 0.0, 0
        return fire

    def state_dict(self) -> dict:
        return {"firings": list(self.firings), "zero_rows": self._zero_rows, "rows": self._rows}

    def load_state_dict(self, state: dict) -> None:
        self.firings = list(state["firings"])
        self._zero_rows, self._rows = state["zero_rows"], state["rows"]
