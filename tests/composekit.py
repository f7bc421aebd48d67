"""docker-compose.yml's services as plain processes, for tests/test_deploy_compose.py.

What compose would do, done by hand: its variable interpolation (`${VAR:-default}`, `${VAR:?error}`,
`$$`), each service's volumes as host folders (a container path in the command or the environment
becomes the host folder mounted there; a path the service does not mount stays as it is, and is
missing, as in its container), other services' addresses (`triton:8001`) replaced by local ones,
and the service's `user:` as the process's uid and gid.

Dropping to that user uses `setpriv`. When the interpreter cannot be reached by that user (a
pyenv Python under /root, mode 0700, as on the CI machine) the process keeps one capability,
CAP_DAC_READ_SEARCH, which bypasses read and directory-search checks only: every write is still
checked against the user's own uid, which is what the test is about. `needs_read_capability`
says which case applies.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?)([-?])([^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's substitution; a `${VAR:?message}` with VAR unset (or empty) raises ValueError."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, colon, op, arg = m.groups()
        value = env.get(name)
        missing = value is None or (colon == ":" and value == "")
        if op is None:
            return value or ""
        if op == "-":
            return arg if missing else str(value)
        if missing:
            raise ValueError(f"{name}: {arg}")
        return str(value)

    return _VARIABLE.sub(one, value)


@dataclass
class Service:
    name: str
    argv: list[str]
    environment: dict[str, str]
    mounts: dict[str, tuple[Path, str]]  # container path -> (host path, "ro" | "rw")
    uid: int
    gid: int


def load_service(compose: dict, name: str, env: Mapping[str, str], addresses: Mapping[str, str]) -> Service:
    """The service `name` with `env` as compose's environment and `addresses` (e.g.
    {"triton:8001": "127.0.0.1:PORT"}) standing for the other services."""
    svc = compose["services"][name]
    mounts: dict[str, tuple[Path, str]] = {}
    for volume in svc.get("volumes", []):
        source, target, *mode = interpolate(volume, env).split(":")
        mounts[target] = (Path(source), mode[0] if mode else "rw")

    def to_host(value: object) -> str:
        text = interpolate(str(value), env)
        for container, (host, _) in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![\w./-]){re.escape(container)}(?![\w.-])", str(host), text)
        for service_address, local in addresses.items():
            text = text.replace(service_address, local)
        return text

    # the image has no ENTRYPOINT (Dockerfile: CMD only), so the argv is entrypoint + command
    argv = [to_host(a) for a in [*svc.get("entrypoint", []), *svc["command"]]]
    environment = {k: to_host(v) for k, v in svc.get("environment", {}).items()}
    return Service(name, argv, environment, mounts, *service_user(compose, name, env))


def service_user(compose: dict, name: str, env: Mapping[str, str]) -> tuple[int, int]:
    """The service's `user: UID:GID` as numbers (it need not exist in /etc/passwd, as in a container)."""
    uid, gid = interpolate(compose["services"][name]["user"], env).split(":")
    return int(uid), int(gid)


def needs_read_capability(uid: int, gid: int) -> bool:
    """True when `uid` cannot start this interpreter and import the serving code on its own."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import server.cli, index.cli"], user=uid, group=gid,
                               extra_groups=[], capture_output=True, timeout=120)
    except PermissionError:  # the interpreter itself is out of reach
        return True
    return probe.returncode != 0


def as_user(uid: int, gid: int, *, read_capability: bool) -> list[str]:
    """The command prefix that runs what follows as uid:gid with no supplementary groups."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise RuntimeError("setpriv (util-linux) is needed to run the services as their user")
    caps = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] if read_capability else []
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *caps, "--"]
