"""Test-session set-up shared by every test module."""
import os
import sys

import pytest
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode

# Property tests explore the same examples on every run: a red CI names a real regression,
# never a new random draw. Set HYPOTHESIS_PROFILE=explore to search afresh.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems():
    # SpeechBrain registers lazy redirect modules for optional integrations (k2, spacy, ...)
    # whose attribute access raises ImportError; hypothesis's plugin reads __file__ of every
    # module in sys.modules after collection and would abort the session on them.
    from speechbrain.utils.importutils import LazyModule

    for name, module in list(sys.modules.items()):
        if isinstance(module, LazyModule) and module.lazy_module is None:
            del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A tiny synthetic VoxCeleb1-layout corpus, read-only: 10 speakers x 4 utterances of 1.2-1.6 s,
    the last 3 speakers in the trial list."""
    from spkver.data.synth import synthesize_corpus

    folder = tmp_path_factory.mktemp("tiny_corpus")
    synthesize_corpus(folder, speakers=10, utterances=4, seed=5, min_seconds=1.2, max_seconds=1.6,
                      test_speakers=3, progress=False)
    return folder


class _LaunchCounter(TorchDispatchMode):
    """Records the torch operations that launch device work (allocations, views and detach do not)."""

    FREE = {"empty", "empty_like", "detach", "unsqueeze", "expand", "view", "_unsafe_view", "squeeze", "select",
            "slice", "permute", "t", "transpose", "_to_copy"}

    def __init__(self):
        super().__init__()
        self.launches = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.FREE:
            self.launches.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launch_counter():
    """A dispatch mode recording the torch operations that launch device work (for launch-bound code)."""
    return _LaunchCounter


@pytest.fixture
def replace_fused_kernel_by_a_noop(monkeypatch):
    """A call that lets CPU tensors take the ``triton`` engine (the GPU path) with the kernel replaced by a
    no-op, so that what surrounds the kernel (the launches a GPU would see) can be counted on any machine."""
    pytest.importorskip("triton")
    from spkver.losses.engines import triton_kernel

    class NoKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def replace():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets CPU tensors ask for engine="triton"
        monkeypatch.setattr(triton_kernel, "_alpha_loss_kernel", NoKernel())

    return replace
