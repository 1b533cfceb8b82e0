"""Peak-memory readings shared by the benchmarks (Linux)."""
import torch


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(run, device: str = "cpu") -> int:
    """Extra peak memory of ``run()``: CUDA's allocator peak, or the resident-set peak growth (VmHWM reset)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set size to the current one
    base = status_kib("VmRSS")
    run()
    return (status_kib("VmHWM") - base) * 1024
