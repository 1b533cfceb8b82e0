"""Make the docs' tables from the runs' JSON files (benchmarks/results/*.json).

Every benchmark writes its figures through measure.Results. In a page of docs/ a block

    <!-- results: bench_losses.cpu methods_256x5994 -->
    ...
    <!-- /results -->

is replaced by one header line (the run's command, machine and date, and the table's title) and
the table as recorded, so that a figure in the docs cannot drift from its run.

    python benchmarks/report.py           # rewrite the pages of docs/ that hold blocks
    python benchmarks/report.py --check   # exit 1, naming the blocks, if the docs differ from the runs
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from measure import RESULTS_FOLDER, markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"(<!-- results: (\S+) (\S+) -->\n)(.*?)(<!-- /results -->)", re.S)


def render(run: dict, key: str) -> str:
    table = run["tables"][key]
    header = f"`{run['command']}` · {run['machine']} · {run['date']} — {table['title']}"
    return f"{header}\n\n{markdown(table)}\n"


def regenerate(text: str, folder: Path = RESULTS_FOLDER, page: str = "docs") -> str:
    """``text`` with every results block made anew from ``folder``'s runs."""
    runs = {}

    def replace(match):
        name, key = match.group(2), match.group(3)
        if name not in runs:
            path = folder / f"{name}.json"
            if not path.exists():
                raise SystemExit(f"report.py: error: {page} names {name}, and {path} does not exist "
                                 f"(run the benchmark: python benchmarks/{name.split('.')[0]}.py)")
            runs[name] = json.loads(path.read_text())
        if key not in runs[name]["tables"]:
            raise SystemExit(f"report.py: error: {name}.json has no table {key!r} "
                             f"(it has {', '.join(runs[name]['tables'])})")
        return match.group(1) + render(runs[name], key) + match.group(5)

    return BLOCK.sub(replace, text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the docs match the runs")
    args = parser.parse_args()
    stale, blocks = [], 0
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        made = regenerate(text, page=page.name)
        blocks += len(BLOCK.findall(text))
        if args.check:
            stale += [f"{page.name}: {a.group(2)} {a.group(3)}"
                      for a, b in zip(BLOCK.finditer(text), BLOCK.finditer(made)) if a.group(0) != b.group(0)]
        elif made != text:
            page.write_text(made)
    if stale:
        print(f"tables differ from their runs: {', '.join(stale)} (python benchmarks/report.py)", file=sys.stderr)
        sys.exit(1)
    print(f"{DOCS}: {blocks} tables {'match their runs' if args.check else 'made from their runs'}")


if __name__ == "__main__":
    main()
