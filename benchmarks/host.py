"""The machine a benchmark runs on, and free loopback ports for the servers it starts.

A sibling module (benchmarks/ is not a package): scripts here import it as `import host`.
"""

from __future__ import annotations

import os
import platform
import re
import socket
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_text(path: str) -> str:
    """A /proc or /sys file's text, or "" where this machine has none."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_basics() -> dict[str, Any]:
    """CPU model and count, memory, OS and Python: what every results file records."""
    cpu = re.search(r"^model name\s*:\s*(.+)$", read_text("/proc/cpuinfo"), re.M)
    mem = re.search(r"^MemTotal:\s*(\d+) kB", read_text("/proc/meminfo"), re.M)
    osr = re.search(r'^PRETTY_NAME="?([^"\n]+)', read_text("/etc/os-release"), re.M)
    return {
        "cpu_model": cpu.group(1).strip() if cpu else platform.processor(),
        "cpus": os.cpu_count(),
        "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "os": osr.group(1) if osr else platform.platform(),
        "python": platform.python_version(),
    }
