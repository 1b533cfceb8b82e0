"""The installed torch, torchaudio and SpeechBrain, checked before they are loaded.

torchaudio ships compiled code built against one torch release, and its
package metadata does not say which: pip will install torch 2.11.0 beside
torchaudio 2.11.1 without a word, and the first ``import torchaudio`` (through
SpeechBrain) then dies with a linker message such as ``undefined symbol:
torch_exception_get_what_without_backtrace``. Since torch 2.1 every torchaudio
release is built for the torch release of the same number, so the rule is
simple: **the two release numbers must be equal**.

:func:`check_environment` reads the installed versions from package metadata
(a few milliseconds; nothing is imported), and ``import spkver`` runs it, so a
broken pair fails with one line that names the installed versions and the
command that fixes it. ``check_environment(load=True)`` also imports
torchaudio and SpeechBrain and turns a failure to load into the same kind of
line; ``spkver environment`` runs that and prints the versions.

>>> check_versions({"torch": "2.11.0+cu130", "torchaudio": "2.11.0", "speechbrain": "1.1.2"})
>>> check_versions({"torch": "2.11.0", "torchaudio": "2.11.1", "speechbrain": "1.1.2"}, pins={"torch": "==2.11.0"})
Traceback (most recent call last):
    ...
spkver.environment.EnvironmentMismatch: torchaudio 2.11.1 is built for torch 2.11.1, but torch 2.11.0 is \
installed (torchaudio would fail to load with 'undefined symbol'); fix: python -m pip install "torch==2.11.0" \
"torchaudio==2.11.0"
"""
from __future__ import annotations

import re
import warnings
from importlib import metadata
from typing import Dict, Optional

from spkver.errors import UserError

__all__ = ["EnvironmentMismatch", "check_environment", "check_versions", "installed_versions"]

#: The packages whose versions must agree (spkver's own requirements name their ranges).
CHECKED = ("torch", "torchaudio", "speechbrain")


class EnvironmentMismatch(UserError, ImportError):
    """An installed combination of torch, torchaudio and SpeechBrain that cannot work; the message is one line."""


def installed_versions() -> Dict[str, Optional[str]]:
    """The installed version of each package of :data:`CHECKED` (``None`` where it is not installed)."""
    versions = {}
    for name in CHECKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _release(version: str) -> str:
    """``2.11.0+cu130`` -> ``2.11.0``: the release number, without local or pre-release tags."""
    match = re.match(r"\d+(\.\d+)*", version)
    return match.group(0) if match else version


def _requirements() -> Dict[str, str]:
    """spkver's own pins of :data:`CHECKED` (``{"torch": "==2.11.0", ...}``), from its installed metadata.

    Empty when spkver runs from a source tree that was never installed."""
    try:
        lines = metadata.requires("spkver") or []
    except metadata.PackageNotFoundError:
        return {}
    pins = {}
    for line in lines:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*([^;]*)(;.*)?$", line)
        if match and match.group(1).lower() in CHECKED and not match.group(3):
            pins[match.group(1).lower()] = match.group(2).strip().replace(" ", "")
    return pins


def _satisfies(version: str, specifier: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # packaging comes with SpeechBrain; without it the range is not checked
        return True
    return SpecifierSet(specifier).contains(version, prereleases=True)


def _fix_command(versions: Dict[str, Optional[str]], pins: Dict[str, str]) -> str:
    torch_pin = pins.get("torch", "")
    if torch_pin.startswith("=="):
        release = torch_pin[2:]
    else:  # keep the installed torch and take the torchaudio built for it
        release = _release(versions["torch"] or "")
        return f'python -m pip install "torchaudio=={release}"'
    return f'python -m pip install "torch=={release}" "torchaudio=={release}"'


def check_versions(versions: Dict[str, Optional[str]], pins: Optional[Dict[str, str]] = None) -> None:
    """Raise :class:`EnvironmentMismatch` for a combination of ``versions`` known not to work.

    ``versions`` maps each package of :data:`CHECKED` to its installed version
    (``None``: not installed); ``pins`` are spkver's requirements (default: read
    from its metadata, else ``torch==2.11.0``-style pins are not known and the
    fix keeps the installed torch). A torch/torchaudio pair of equal releases
    that spkver was not tested with gives a warning, not an error.
    """
    pins = _requirements() if pins is None else pins
    for name in CHECKED:
        if versions.get(name) is None:
            wanted = f"{name}{pins.get(name, '')}"
            raise EnvironmentMismatch(f"{name} is not installed; fix: python -m pip install \"{wanted}\"")
    torch_version, audio_version = versions["torch"], versions["torchaudio"]
    if _release(torch_version) != _release(audio_version):
        raise EnvironmentMismatch(
            f"torchaudio {audio_version} is built for torch {_release(audio_version)}, but torch {torch_version} "
            f"is installed (torchaudio would fail to load with 'undefined symbol'); "
            f"fix: {_fix_command(versions, pins)}")
    speechbrain_range = pins.get("speechbrain")
    if speechbrain_range and not _satisfies(versions["speechbrain"], speechbrain_range):
        raise EnvironmentMismatch(
            f"speechbrain {versions['speechbrain']} is outside the range spkver supports ({speechbrain_range}); "
            f"fix: python -m pip install \"speechbrain{speechbrain_range}\"")
    torch_range = pins.get("torch")
    if torch_range and not _satisfies(_release(torch_version), torch_range):
        warnings.warn(f"spkver is tested with torch{torch_range} and the torchaudio of the same release; "
                      f"torch {torch_version} with torchaudio {audio_version} is untested", stacklevel=3)


def _check_loadable(versions: Dict[str, Optional[str]]) -> None:
    """Import torchaudio and SpeechBrain; a failure to load becomes an :class:`EnvironmentMismatch`."""
    for name in ("torchaudio", "speechbrain"):
        try:
            __import__(name)
        except (ImportError, OSError) as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            installed = ", ".join(f"{n} {v}" for n, v in versions.items())
            raise EnvironmentMismatch(
                f"{name} cannot be loaded with {installed} ({reason}); fix: reinstall the pair spkver pins, "
                f"{_fix_command(versions, _requirements())}") from None


def check_environment(load: bool = False) -> Dict[str, Optional[str]]:
    """Check the installed torch/torchaudio/SpeechBrain (and with ``load``, that they import); return the versions."""
    versions = installed_versions()
    check_versions(versions)
    if load:
        _check_loadable(versions)
    return versions
