"""A torch/torchaudio/SpeechBrain combination that cannot work fails with one readable line."""
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from spkver.environment import EnvironmentMismatch, check_environment, check_versions, installed_versions

ROOT = Path(__file__).resolve().parent.parent
PINS = {"torch": "==2.11.0", "torchaudio": "==2.11.0", "speechbrain": ">=1.1,<1.2"}
GOOD = {"torch": "2.11.0+cu130", "torchaudio": "2.11.0", "speechbrain": "1.1.2"}


def test_the_installed_environment_passes_and_loads():
    versions = check_environment(load=True)
    assert versions == installed_versions() and all(versions.values())


def test_a_torchaudio_built_for_another_torch_names_both_versions_and_the_fix():
    with pytest.raises(EnvironmentMismatch) as error:
        check_versions({**GOOD, "torch": "2.11.0", "torchaudio": "2.11.1"}, PINS)
    assert str(error.value) == (
        "torchaudio 2.11.1 is built for torch 2.11.1, but torch 2.11.0 is installed (torchaudio would fail to "
        "load with 'undefined symbol'); fix: python -m pip install \"torch==2.11.0\" \"torchaudio==2.11.0\"")
    assert "\n" not in str(error.value)


def test_without_spkvers_pins_the_fix_keeps_the_installed_torch():
    with pytest.raises(EnvironmentMismatch, match=r'fix: python -m pip install "torchaudio==2.12.0"$'):
        check_versions({**GOOD, "torch": "2.12.0", "torchaudio": "2.11.0"}, pins={})


def test_a_speechbrain_outside_the_supported_range_is_an_error():
    with pytest.raises(EnvironmentMismatch,
                       match=r"speechbrain 1.0.3 is outside the range spkver supports "
                             r"\(>=1.1,<1.2\); fix: python -m pip install \"speechbrain>=1.1,<1.2\""):
        check_versions({**GOOD, "speechbrain": "1.0.3"}, PINS)


def test_a_missing_package_is_named():
    with pytest.raises(EnvironmentMismatch, match=r'^torchaudio is not installed; fix: .*"torchaudio==2.11.0"'):
        check_versions({**GOOD, "torchaudio": None}, PINS)


def test_a_matched_but_untested_pair_only_warns():
    with pytest.warns(UserWarning, match=r"tested with torch==2.11.0 .* torch 2.12.0 with torchaudio 2.12.0"):
        check_versions({**GOOD, "torch": "2.12.0", "torchaudio": "2.12.0"}, PINS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_versions(GOOD, PINS)  # a CUDA build's local tag (+cu130) is the same release


def _fake_distribution(folder: Path, name: str, version: str) -> None:
    """Package metadata that shadows the installed one (PYTHONPATH comes first on sys.path)."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _run(code_or_command, fake: Path):
    command = code_or_command if isinstance(code_or_command, list) else [sys.executable, "-c", code_or_command]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(fake), "PATH": "/usr/bin:/bin"})


def test_importing_spkver_with_the_broken_pair_of_the_bug_report_fails_in_one_line(tmp_path):
    """torch 2.11.0 beside torchaudio 2.11.1, as a floating pin once installed them."""
    _fake_distribution(tmp_path, "torchaudio", "2.11.1")
    for command in ("import spkver", [sys.executable, str(ROOT / "recipes" / "voxceleb" / "train.py"),
                                      str(ROOT / "hparams" / "demo_qmargin.yaml")]):
        completed = _run(command, tmp_path)
        assert completed.returncode == 1
        last = completed.stderr.strip().splitlines()[-1]
        assert last.startswith("spkver.environment.EnvironmentMismatch: torchaudio 2.11.1 is built for torch "
                               "2.11.1, but torch 2.11.0 is installed")
        assert last.endswith('fix: python -m pip install "torch==2.11.0" "torchaudio==2.11.0"')
        assert "undefined symbol:" not in completed.stderr  # nothing tried to load the library


def test_a_torchaudio_that_cannot_load_is_reported_by_spkver_environment(tmp_path):
    _fake_distribution(tmp_path, "torchaudio", "2.11.0")
    (tmp_path / "torchaudio").mkdir()
    (tmp_path / "torchaudio" / "__init__.py").write_text(
        "raise OSError('Could not load this library: libtorchaudio.so (undefined symbol: torch_exception_get_what)')")
    completed = _run([sys.executable, "-m", "spkver.cli", "environment"], tmp_path)
    installed = installed_versions()
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        f"spkver environment: error: torchaudio cannot be loaded with torch {installed['torch']}, torchaudio 2.11.0, "
        f"speechbrain {installed['speechbrain']} (Could not load this library: libtorchaudio.so (undefined symbol: "
        "torch_exception_get_what)); fix: reinstall the pair spkver pins, "
        "python -m pip install \"torch==2.11.0\" \"torchaudio==2.11.0\"")


def _readme_commands() -> list[str]:
    """The command lines of the README's set-up block."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set-up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_installs_and_tests_exactly_as_the_readmes_set_up_says():
    """Every step of the README's test command, in its order, is a line of ``.ci/run``."""
    test_command = [line for line in _readme_commands() if "pytest" in line]
    assert len(test_command) == 1
    steps = [step.strip() for step in test_command[0].split("&&")]
    ci_lines = [line.split("  #")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert [line for line in ci_lines if line in steps] == steps
    install = steps[:3]  # the demo installs the same way
    assert all(line.split(" && ")[:3] == install for line in _readme_commands())


def test_the_lock_holds_the_pinned_torch_pair_with_hashes():
    """The lock and setup.cfg pin the same torch/torchaudio pair, and pip checks every file by hash."""
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    for name in ("torch", "torchaudio"):
        assert re.search(rf"^{name}{PINS[name]} \\\n    --hash=sha256:[0-9a-f]{{64}}", lock, re.M), name
        assert f"    {name}{PINS[name]}\n" in (ROOT / "setup.cfg").read_text()
    requirements = re.findall(r"^([A-Za-z0-9_.-]+)==\S+ \\$", lock, re.M)
    assert len(requirements) > 50 and all(
        re.search(rf"^{re.escape(name)}==\S+ \\\n    --hash=sha256:", lock, re.M) for name in requirements)
