"""How much memory this process may still use (the checks that refuse a job before an OOM kill would end it)."""

from __future__ import annotations

import contextlib
from pathlib import Path


def available_ram() -> int:
    """Bytes this process may still allocate: MemAvailable, capped by its cgroup's memory limit (a container's)."""
    avail = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    limits = []
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                limits.append(int(limit) - int(Path(usage_file).read_text().strip()))
    known = [v for v in (avail, *limits) if v is not None]
    return max(0, min(known)) if known else 1 << 62
