"""Memory budgets: "4GB", "512MiB" or a number of bytes, and the default when none is given.

The budget bounds the RAM a search of the index touches once warm (vector_index.ram_bytes: codes,
ids, centroids, and the exact vectors when it re-ranks). It is recorded in the index
(`memory_budget`; `index build --memory-budget` changes it, taking effect at the next compaction).
0, the default, means half of this machine's physical memory, read when the index is planned, so
an index moved to a bigger machine may grow into it.
"""

from __future__ import annotations

import os
import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
DEFAULT_SHARE_OF_RAM = 0.5


def parse_bytes(value: int | str | None) -> int:
    """Bytes from 4GB (10^9), 4GiB or 4G (2^30), 512MB, 1000000; None or 0: 0 (the default budget)."""
    if value is None:
        return 0
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a memory budget cannot be negative: {value}")
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory budget {value!r}: give a number of bytes or a size such as 4GB, 512MiB, 2G "
                         f"(units: {', '.join(u for u in _UNITS if u)})")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def effective_budget(recorded: int) -> int:
    """The recorded budget, or the default share of this machine's RAM when none was given."""
    return int(recorded) or int(DEFAULT_SHARE_OF_RAM * physical_memory())
