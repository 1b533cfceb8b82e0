"""Measurements shared by the benchmarks: the device's name, synchronisation, the median time of a call,
peak memory (Linux), a command timed in a fresh process, and :class:`Results`, through which every
benchmark writes its figures."""
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch


def device_name(device: str) -> str:
    """The GPU's name, or the CPU and its torch thread count, for a benchmark's header."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer sees all of it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(run, repeats: int, device: str = "cpu", warmup: int = 0) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``run()``, after ``warmup`` calls not timed; each
    call synchronised with the device, so that the timer sees all its work."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(run, device: str = "cpu") -> int:
    """Extra peak memory of ``run()``: CUDA's allocator peak, or the resident-set peak growth (VmHWM reset)."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set size to the current one
    base = status_kib("VmRSS")
    run()
    return (status_kib("VmHWM") - base) * 1024


#: Where every benchmark writes its figures; ``python benchmarks/report.py`` makes docs/benchmarks.md's tables.
RESULTS_FOLDER = Path(__file__).resolve().parent / "results"


class Results:
    """One run's figures: each table printed as it is made, then written with the run's command, machine
    and date to ``benchmarks/results/<name>.json`` (``<script>.<device>[.<variant>].json``), which
    report.py reads.

    >>> results = Results("bench_example", "cpu", argv=["bench_example.py", "--repeats", "3"])
    >>> results.document["command"]
    'python benchmarks/bench_example.py --repeats 3'
    """

    def __init__(self, script: str, device: str = "cpu", argv: Optional[Sequence[str]] = None, variant: str = ""):
        argv = list(sys.argv if argv is None else argv)
        self.name = ".".join([script, torch.device(device).type] + ([variant] if variant else []))
        self.document = {
            "benchmark": script,
            "command": " ".join(["python", f"benchmarks/{Path(argv[0]).name}", *argv[1:]]),
            "machine": device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "tables": {},
        }

    def table(self, key: str, title: str, columns: Sequence[str], rows: Sequence[Sequence], align=None) -> None:
        """Record (and print) a table: ``columns`` names, ``rows`` of already formatted cells."""
        rows = [[str(cell) for cell in row] for row in rows]
        align = align or ["---"] + ["---:"] * (len(columns) - 1)
        self.document["tables"][key] = {"title": title, "columns": list(columns), "rows": rows, "align": list(align)}
        print(f"\n## {title}\n{markdown(self.document['tables'][key])}", flush=True)

    def save(self, folder: Optional[Path] = None) -> Path:
        folder = Path(folder or RESULTS_FOLDER)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(self.document, indent=2) + "\n")
        print(f"\nwritten to {path}")
        return path


def markdown(table: dict) -> str:
    """A recorded table as Markdown."""
    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "|".join(table["align"]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def run_measured(args: Sequence[str]):
    """Run a command in a fresh process; return (wall seconds, peak RSS in MiB, its output)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stdout.write(p.stdout + p.stderr); "
             "print(f'@@ {time.perf_counter() - t} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); "
             "sys.exit(p.returncode)")
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True).stdout
    *text, last = out.rstrip("\n").split("\n")
    _, wall, rss_kib = last.split()
    return float(wall), int(rss_kib) / 1024, "\n".join(text)
