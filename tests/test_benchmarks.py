"""The benchmarks' conventions: one naming pattern, JSON through measure.py, docs tables made from the JSON."""
import ast
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SHARED = {"measure.py", "report.py"}
SCRIPTS = sorted(path for path in BENCHMARKS.glob("*.py") if path.name not in SHARED)


def test_every_script_is_named_bench_or_experiment_and_writes_its_figures_through_measure():
    assert len(SCRIPTS) >= 10
    for path in SCRIPTS:
        assert path.name.startswith(("bench_", "experiment_")), path.name
        source = path.read_text()
        assert "Results(" in source and ".save()" in source, f"{path.name} writes no JSON through measure.Results"


def test_no_script_patches_sys_path_or_imports_a_sibling_other_than_measure():
    siblings = {path.stem for path in BENCHMARKS.glob("*.py")} - {"measure"}
    for path in [*SCRIPTS, BENCHMARKS / "report.py"]:
        source = path.read_text()
        assert "sys.path" not in source, path.name
        imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)} | \
            {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for alias in node.names}
        assert not imported & siblings, (path.name, imported & siblings)


def test_the_tables_of_the_docs_are_those_of_the_committed_runs():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "report.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tables match their runs" in done.stdout
