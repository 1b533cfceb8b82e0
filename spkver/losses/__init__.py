"""Alpha-divergence losses, margin objectives and A3M-I prototype re-initialisation.

The layers, each in its own module: the alpha-softargmax maths and its
certificate (:mod:`.softargmax`), the input checks (:mod:`.checks`), the
engines and the registry that picks one (:mod:`.engines`), the loss function
(:mod:`.loss`), and on top the margin objectives (:mod:`.objectives`), the
streaming head for very many classes (:mod:`.sparse_head`) and A3M-I
(:mod:`.reinit`).

>>> import torch
>>> objective = QMargin(scale=10.0, margin=0.2, alpha=1.5)
>>> cosine = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1]])
>>> loss = objective(cosine, torch.tensor([0, 1]))
>>> objective.last_statistics.target_zero_fraction
0.0
"""
from spkver.losses.engines import ENGINE_NAMES, EngineChoice, EngineError
from spkver.losses.engines.base import SparsityStatistics
from spkver.losses.loss import alpha_divergence_loss
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
from spkver.losses.reinit import (
    ClassMeanAccumulator,
    ReinitializationPolicy,
    reinitialize_prototypes,
)
from spkver.losses.softargmax import alpha_softargmax
from spkver.losses.sparse_head import StreamingSparseHead

__all__ = [
    "alpha_softargmax",
    "alpha_divergence_loss",
    "SparsityStatistics",
    "ENGINE_NAMES",
    "EngineChoice",
    "EngineError",
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
