"""What `index stats` says about the vector index: kind, shape, training, recall estimate, memory, layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from index import compaction
from index import vector_index as vi
from index.faiss_file import base_paths, file_bytes
from index.layered import LayeredIndex


def vector_index_stats(directory: Path, meta: dict[str, Any], layered: LayeredIndex, dim: int) -> dict[str, Any]:
    """Type, shape, training, recall estimate, memory and layers of the vector index (under the read lock)."""
    plan = vi.Plan.of_meta(meta)
    estimate = {k: v for k, v in (meta.get("recall_estimate") or {}).items() if k != "table"}
    base = layered.base
    return {
        "pq_m": plan.pq_m, "opq": plan.opq, "rerank": plan.rerank, "k_factor": int(meta["k_factor"]),
        "trained_on": int(meta["trained_on"]), "training_size": int(meta["training_size"]),
        "recall_target": float(meta["recall_target"]), "recall_estimate": estimate,
        "memory": {
            "budget_bytes": compaction.memory_budget(meta), "budget_recorded": int(meta["memory_budget"]),
            "index_ram_bytes": vi.ram_bytes(plan, layered.ntotal, dim),
            "delta_ram_bytes": layered.ram_bytes(), "base_file_bytes": file_bytes(base_paths(directory,
                                                                                             base.generation)),
            "process_rss_bytes": process_rss(),
        },
        "base": {"generation": base.generation, "count": len(base), "hwm": base.hwm,
                 "build": meta.get("base_build") or {}},
        "delta_count": layered.delta_count, "removed_since_base": len(layered.removed),
        "compaction_due": compaction.due(meta, layered),
        "whitening": {"mode": meta["whiten"], "fitted_on": int(meta["whitening_fitted_on"]),
                      "active": layered.whitening is not None, "spec": meta.get("whitening_spec") or {}},
    }


def process_rss() -> int:
    """This process's resident memory in bytes (Linux), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
