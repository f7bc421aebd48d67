"""The load generators of bench/serve_load.py: single-image multipart requests built once, sent by
asyncio keep-alive clients in the calling process (`run_level`) or by wrk (`run_level_wrk`, the C
load generator, which needs about half the CPU per request on the server's own cores)."""

from __future__ import annotations

import asyncio
import re
import resource
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def multipart_request(path: str, host: str, image: bytes, fields: dict[str, str]) -> bytes:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    file_field = "files" if path.endswith("/embed") else "file"
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="q.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _client(port: int, requests: list[bytes], deadline: float, budget: list[int],
                  latencies: list[float], errors: list[str], offset: int, workers: dict[bytes, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            req = requests[i % len(requests)]
            i += 1
            t0 = time.perf_counter()
            writer.write(req)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                lower = line.lower()
                if lower.startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                elif lower.startswith(b"x-simsearch-worker:"):
                    pid = line.split(b":")[1].strip()
                    workers[pid] = workers.get(pid, 0) + 1
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            status = status_line.split(b" ")[1] if b" " in status_line else b"?"
            if status != b"200":
                errors.append(status.decode())
    finally:
        writer.close()


async def run_level(port: int, requests: list[bytes], clients: int, seconds: float, max_requests: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    workers: dict[bytes, int] = {}
    budget = [max_requests]
    t0 = time.perf_counter()
    await asyncio.gather(*(
        _client(port, requests, t0 + seconds, budget, latencies, errors, offset=c * 7, workers=workers)
        for c in range(clients)
    ))
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": round(elapsed, 2),
        "rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "by_worker": sorted(workers.values(), reverse=True),
    }


WRK_LUA = """
local reqs, n, i = {}, %d, 0
for k = 0, n - 1 do
  local f = io.open("%s/" .. k .. ".bin", "rb"); local body = f:read("*all"); f:close()
  local g = io.open("%s/" .. k .. ".type", "r"); local ctype = g:read("*all"); g:close()
  reqs[k + 1] = wrk.format("POST", "%s", {["Content-Type"] = ctype}, body)
end
request = function()
  i = i + 1
  return reqs[(i %% n) + 1]
end
"""


def wrk_script(work: Path, path: str, requests: list[bytes]) -> Path:
    """A wrk Lua script that cycles through the same requests the Python clients send."""
    folder = work / "wrk-bodies"
    folder.mkdir(exist_ok=True)
    for k, req in enumerate(requests):
        head, body = req.split(b"\r\n\r\n", 1)
        ctype = next(ln.split(b":", 1)[1].strip() for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-type:"))
        (folder / f"{k}.bin").write_bytes(body)
        (folder / f"{k}.type").write_bytes(ctype)
    script = work / "requests.lua"
    script.write_text(WRK_LUA % (len(requests), folder, folder, path))
    return script


def run_level_wrk(port: int, script: Path, clients: int, seconds: float) -> dict[str, Any]:
    """One level with wrk (one thread, `clients` connections); its CPU from the children's rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script),
                          f"http://127.0.0.1:{port}"], capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)

    def ms(label: str) -> float:
        value = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert value, out
        return float(value.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[value.group(2)]

    done = re.search(r"(\d+) requests in ([\d.]+)(ms|s)", out)
    assert done, out
    requests, elapsed = int(done.group(1)), float(done.group(2)) * (1e-3 if done.group(3) == "ms" else 1.0)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"clients": clients, "requests": requests, "errors": errors, "seconds": round(elapsed, 2),
            "rps": requests / elapsed, "p50_ms": ms("50%"), "p99_ms": ms("99%"), "by_worker": [],
            "client_cpu_ms_per_request": 1000 * cpu / max(requests, 1)}
