"""One user-error type: every error that names the user's input is a UserError, printed as one line with
exit status 2; anything else is a bug and keeps its traceback (exit status 1)."""
import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

import spkver
from spkver import cli
from spkver.errors import UserError


def _spkver_modules():
    for module in pkgutil.walk_packages(spkver.__path__, "spkver."):
        yield importlib.import_module(module.name)


def test_every_error_class_of_spkver_is_a_user_error():
    """A new error class that forgets the base would print a traceback for a typo in a file name."""
    errors = {f"{module.__name__}.{name}": value for module in _spkver_modules()
              for name, value in vars(module).items()
              if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__}
    assert len(errors) >= 12, sorted(errors)
    assert [name for name, value in errors.items() if not issubclass(value, UserError)] == []


def test_a_user_error_is_one_line_with_status_2(tmp_path, capsys):
    missing = tmp_path / "no-such-trials.txt"
    assert cli.main(["score", "--trials", str(missing), "--embeddings", str(tmp_path / "no.npz")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("spkver score: error: ") and "Traceback" not in error


def test_an_internal_error_keeps_its_traceback_and_status_1(tmp_path):
    """A bug (here a TypeError injected into the score command) is not dressed up as bad input."""
    script = ("import sys, spkver.cli as cli\n"
              "def broken(args):\n    raise TypeError('an injected bug')\n"
              "parser = cli.build_parser\n"
              "def build():\n    p = parser()\n"
              "    p._subparsers._group_actions[0].choices['score'].set_defaults(handler=broken)\n    return p\n"
              "cli.build_parser = build\n"
              "sys.exit(cli.main(['score', '--trials', 'x.txt', '--embeddings', 'x.npz']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "TypeError: an injected bug" in done.stderr


@pytest.mark.parametrize("error", [MemoryError("out of memory"), RuntimeError("CUDA error"), ValueError("a bug")])
def test_errors_that_are_not_user_errors_propagate_from_the_command_line(error, monkeypatch):
    def broken(args):
        raise error

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["environment"].set_defaults(handler=broken)
    with pytest.raises(type(error)):
        cli.main(["environment"])
