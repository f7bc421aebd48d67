"""Thread priority: let the event loop win the CPU over the model's compute threads.

With ONNX Runtime using every core, its busy intra-op threads and the one thread that runs the
event loop (HTTP parsing, routing, responses) compete for the same cores, and the loop falls behind
exactly when the model is busiest. Threads created by a thread inherit its nice value on Linux, so
opening the backend and running inference from threads with a higher nice value makes the whole
ONNX Runtime pool yield to the loop. A no-op where per-thread priorities do not exist.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def lower_current_thread_priority(nice: int) -> bool:
    """Raise this thread's nice value by `nice` (Linux); False where that is not possible."""
    if nice <= 0:
        return False
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + nice))
    except (AttributeError, OSError) as e:
        log.debug("cannot lower thread priority: %s", e)
        return False
    return True
