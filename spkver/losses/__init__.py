"""Alpha-divergence losses, margin objectives and A3M-I prototype re-initialisation.

>>> import torch
>>> objective = QMargin(scale=10.0, margin=0.2, alpha=1.5)
>>> cosine = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1]])
>>> loss = objective(cosine, torch.tensor([0, 1]))
>>> objective.last_statistics.target_zero_fraction
0.0
"""
from spkver.losses.objectives import (
    A3M,
    AlphaDiv,
    ArcFace,
    CosFace,
    CosineMarginObjective,
    MarginWarmup,
    QMargin,
    Softmax,
    additive_angular_cosine,
    qmargin_log_q_target,
    qmargin_zero_loss_gap,
)
from spkver.losses.operator import (
    SparsityStatistics,
    alpha_divergence_loss,
    alpha_softargmax,
)
from spkver.losses.sparse_head import StreamingSparseHead
from spkver.losses.reinit import (
    ClassMeanAccumulator,
    ReinitializationPolicy,
    reinitialize_prototypes,
)

__all__ = [
    "alpha_softargmax",
    "alpha_divergence_loss",
    "SparsityStatistics",
    "CosineMarginObjective",
    "Softmax",
    "CosFace",
    "ArcFace",
    "AlphaDiv",
    "QMargin",
    "A3M",
    "MarginWarmup",
    "additive_angular_cosine",
    "qmargin_log_q_target",
    "qmargin_zero_loss_gap",
    "ClassMeanAccumulator",
    "reinitialize_prototypes",
    "ReinitializationPolicy",
    "StreamingSparseHead",
]
