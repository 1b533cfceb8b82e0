"""Test-session set-up shared by every test module."""
import sys

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems():
    # SpeechBrain registers lazy redirect modules for optional integrations (k2, spacy, ...)
    # whose attribute access raises ImportError; hypothesis's plugin reads __file__ of every
    # module in sys.modules after collection and would abort the session on them.
    from speechbrain.utils.importutils import LazyModule

    for name, module in list(sys.modules.items()):
        if isinstance(module, LazyModule) and module.lazy_module is None:
            del sys.modules[name]
