"""What a node tells the coordinator about itself when it joins (`node_facts`).

Fast on purpose (a join should not wait on `system_profiler`): host, OS, chip, CPU and GPU
cores, memory, the torch device it will train on, torch and macfleet versions. The slow,
complete description of a machine is `macfleet info` (info.py). Every value is JSON-safe.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from typing import Optional


def run_command(cmd: list[str], timeout: float = 2.0) -> str:
    """stdout of a short command, '' when it is missing, fails or outlives `timeout` s."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def chip_name() -> str:
    """'Apple M2 Pro' on a Mac, the CPU model name elsewhere."""
    if sys.platform == "darwin":
        name = run_command(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
        if name:
            return name
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # psutil missing or unsupported platform
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return None


def gpu_cores_fast() -> Optional[int]:
    """Apple GPU core count from ioreg (fast); None off macOS."""
    if sys.platform != "darwin":
        return None
    from macfleet.cluster.info import parse_ioreg_gpu_cores

    return parse_ioreg_gpu_cores(run_command(["ioreg", "-rc", "AGXAccelerator", "-d", "1"]))


def best_device() -> str:
    """mps, then cuda, then cpu: the device `trainer.device=auto` would pick."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def node_facts(device: Optional[str] = None) -> dict:
    """This node's facts for the coordinator (fast; see the module docstring)."""
    # Read the version from package metadata: importing torch here would cost seconds.
    from importlib import metadata

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    from macfleet import __version__

    return {
        "host": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "chip": chip_name(),
        "cpu_cores": os.cpu_count(),
        "gpu_cores": gpu_cores_fast(),
        "memory_bytes": memory_bytes(),
        "device": device or best_device(),
        "torch": torch_version,
        "macfleet": __version__,
        "python": platform.python_version(),
        "pid": os.getpid(),
    }
