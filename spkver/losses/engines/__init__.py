r"""The loss engines and the registry that chooses one: which engine runs a call, and why.

=========  =====================================================  ==========================================
engine     what it is                                             serves
=========  =====================================================  ==========================================
``triton`` the fused Triton kernel (:mod:`.triton_kernel`): one   CUDA tensors, :math:`1 \le \alpha \le 2`,
           launch, no host sync                                   unit measure except :math:`q_y`
``cpu``    the compiled C kernel (:mod:`.cpu_kernel`): one        CPU tensors, :math:`1 < \alpha \le 2`,
           selection pass per row                                 unit measure except :math:`q_y`
``dense``  softmax cross-entropy (:mod:`.dense`)                  :math:`\alpha = 1`, anything
``torch``  the pure-torch solver (:mod:`.torch_solver`)           :math:`\alpha > 1`, anything
=========  =====================================================  ==========================================

``engine="auto"`` (every objective's default) takes the first of
:data:`AUTO_PREFERENCE` that serves the call; naming an engine that cannot
serve it is a :class:`EngineError` that says why, never a silent fallback.
A new engine is a module here with an :class:`~.base.Engine` subclass,
registered in :data:`ENGINES` (and in :data:`AUTO_PREFERENCE` if ``auto``
may choose it).

>>> import torch
>>> from spkver.losses.engines.base import LossCall
>>> call = LossCall(torch.zeros(2, 5), torch.tensor([0, 1]), alpha=1.0)
>>> choice = select_engine("auto", call)
>>> choice.name
'dense'
>>> select_engine("torch", call).name
Traceback (most recent call last):
...
spkver.losses.engines.EngineError: engine 'torch' cannot serve this call: alpha = 1 is the softmax ...
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

from spkver.losses.checks import LossInputError
from spkver.losses.engines.base import Engine, LossCall, SparsityStatistics
from spkver.losses.engines.cpu_kernel import CpuKernelEngine
from spkver.losses.engines.dense import DenseEngine
from spkver.losses.engines.torch_solver import TorchSolverEngine
from spkver.losses.engines.triton_kernel import TritonEngine

__all__ = ["ENGINES", "ENGINE_NAMES", "AUTO_PREFERENCE", "EngineError", "EngineChoice", "check_engine_name",
           "select_engine", "Engine", "LossCall", "SparsityStatistics"]

#: Every engine, by name.
ENGINES: Dict[str, Engine] = {engine.name: engine for engine in
                              (TritonEngine(), CpuKernelEngine(), DenseEngine(), TorchSolverEngine())}
#: The names an ``engine`` argument accepts.
ENGINE_NAMES: Tuple[str, ...] = ("auto",) + tuple(ENGINES)
#: The order in which ``auto`` tries the engines: the fastest that serves the call runs it.
AUTO_PREFERENCE: Tuple[str, ...] = ("triton", "cpu", "dense", "torch")


class EngineError(LossInputError):
    """An engine was asked for by name and cannot serve the call, or the name is unknown."""


@dataclasses.dataclass(frozen=True)
class EngineChoice:
    """The engine that runs a call, and why (the recipe logs it once)."""

    engine: Engine
    reason: str

    @property
    def name(self) -> str:
        return self.engine.name

    def describe(self) -> str:
        """One line: ``'cpu' (the compiled CPU kernel ...): auto: triton: ...``."""
        return f"'{self.name}' ({self.engine.summary}): {self.reason}"


def check_engine_name(engine: str) -> str:
    """``engine`` if it is ``auto`` or a registered engine's name, else an :class:`EngineError`."""
    if engine not in ENGINE_NAMES:
        raise EngineError(f"engine must be one of {', '.join(ENGINE_NAMES)}; got {engine!r}")
    return engine


def select_engine(engine: str, call: LossCall) -> EngineChoice:
    """The engine that runs ``call``: the one named, or with ``"auto"`` the first of
    :data:`AUTO_PREFERENCE` that serves it."""
    check_engine_name(engine)
    if engine != "auto":
        reason = ENGINES[engine].unsupported(call, automatic=False)
        if reason is not None:
            raise EngineError(f"engine '{engine}' cannot serve this call: {reason}")
        return EngineChoice(ENGINES[engine], "asked for by name")
    declined = []
    for name in AUTO_PREFERENCE:
        reason = ENGINES[name].unsupported(call, automatic=True)
        if reason is None:
            passed = f" ({'; '.join(declined)})" if declined else ""
            return EngineChoice(ENGINES[name], f"auto: the first engine of {', '.join(AUTO_PREFERENCE)} that "
                                               f"serves alpha = {call.alpha:g} on {call.logits.device.type}{passed}")
        declined.append(f"{name}: {reason}")
    raise EngineError("no engine serves this call: " + "; ".join(declined))  # torch serves every alpha > 1
