"""Measurements shared by the benchmarks: the device's name, synchronisation, peak memory (Linux)."""
import torch


def device_name(device: str) -> str:
    """The GPU's name, or the CPU and its torch thread count, for a benchmark's header."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer sees all of it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
