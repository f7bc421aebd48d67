"""docker-compose.yml's services as plain processes, for tests/test_deploy_compose.py.

What compose would do, done by hand:
- its variable interpolation (`${VAR:-default}`, `${VAR:?error}`, `$$`);
- each service's volumes: every container path of the file (`/images`, `/index`, ...) is one host
  path under `Containers.root`, the same string for every service, holding only the mounts of the
  services running now (two at once only where they mount the same thing). A read-only mount is a
  copy there, so a path a service records (the indexer records its folder's path) stays a
  container path: it means something to another service only if that one mounts the same thing at
  the same place, as in Docker. A read-write mount is a symlink to the host folder, so writes land
  there; a service that does not mount a path finds nothing there;
- other services' addresses (`triton:8001`) replaced by local ones;
- the service's `user:` as the process's uid and gid, dropped with `setpriv`. When that user cannot
  reach the interpreter (a pyenv Python under /root, mode 0700, as on the CI machine) the process
  keeps one capability, CAP_DAC_READ_SEARCH: it bypasses read and directory-search checks only,
  so every write is still checked against the user's own uid, which is what the tests are about.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
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
    mounts: dict[str, tuple[Path, str]]  # container path -> (host source, "ro" | "rw")
    uid: int
    gid: int


def service_user(compose: dict, name: str, env: Mapping[str, str]) -> tuple[int, int]:
    """The service's `user: UID:GID` as numbers (it need not exist in /etc/passwd, as in a container)."""
    uid, gid = interpolate(compose["services"][name]["user"], env).split(":")
    return int(uid), int(gid)


def _volumes(svc: dict, env: Mapping[str, str]) -> dict[str, tuple[Path, str]]:
    mounts = {}
    for volume in svc.get("volumes", []):
        source, target, *mode = interpolate(volume, env).split(":")
        mounts[target] = (Path(source), mode[0] if mode else "rw")
    return mounts


class Containers:
    """The services of one compose file, with `env` as compose's environment and `addresses`
    (e.g. {"triton:8001": "127.0.0.1:PORT"}) standing for other services; container paths under `root`."""

    def __init__(self, compose: dict, env: Mapping[str, str], root: Path, addresses: Mapping[str, str]) -> None:
        self.compose, self.env, self.root, self.addresses = compose, env, root, addresses
        root.mkdir(mode=0o755)
        self._active: dict[str, list] = {}  # container path -> [(source, mode), services using it]
        targets = {t for svc in compose["services"].values() for t in _volumes(svc, _AnyValue())}
        self.container_paths = sorted(targets, key=len, reverse=True)  # longest first: /index before /i

    def host(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def _to_host(self, value: object) -> str:
        text = interpolate(str(value), self.env)
        for path in self.container_paths:
            text = re.sub(rf"(?<![\w./-]){re.escape(path)}(?![\w.-])", str(self.host(path)), text)
        for service_address, local in self.addresses.items():
            text = text.replace(service_address, local)
        return text

    def service(self, name: str) -> Service:
        svc = self.compose["services"][name]
        # the image has no ENTRYPOINT (Dockerfile: CMD only), so the argv is entrypoint + command
        argv = [self._to_host(a) for a in [*svc.get("entrypoint", []), *svc["command"]]]
        environment = {k: self._to_host(v) for k, v in svc.get("environment", {}).items()}
        return Service(name, argv, environment, _volumes(svc, self.env), *service_user(self.compose, name, self.env))

    @contextlib.contextmanager
    def mounted(self, service: Service) -> Iterator[None]:
        """The service's volumes in place under `root` while it runs; gone afterwards (`run --rm`).
        Services running at once share a path only when they mount the same thing there."""
        held = []
        try:
            for target, mount in service.mounts.items():
                self._acquire(target, mount)
                held.append(target)
            yield
        finally:
            for target in reversed(held):
                self._release(target)

    def _acquire(self, target: str, mount: tuple[Path, str]) -> None:
        if target in self._active:
            assert self._active[target][0] == mount, f"{target}: two different mounts at once"
            self._active[target][1] += 1
            return
        source, mode = mount
        where = self.host(target)
        where.parent.mkdir(parents=True, exist_ok=True)
        if mode == "rw":
            where.symlink_to(source, target_is_directory=True)
        elif source.is_dir():
            shutil.copytree(source, where, symlinks=False)
            _readable(where)
        else:  # e.g. /dev/null for an unset folder: not a directory in the container
            where.write_bytes(b"")
        self._active[target] = [mount, 1]

    def _release(self, target: str) -> None:
        self._active[target][1] -= 1
        if self._active[target][1]:
            return
        del self._active[target]
        where = self.host(target)
        if where.is_dir() and not where.is_symlink():
            shutil.rmtree(where)
        else:
            where.unlink()


class _AnyValue(dict):
    """An environment in which every variable is set: for reading mount targets only."""

    def get(self, key: str, default: object = None) -> str:
        return "x"


def _readable(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def needs_read_capability(uid: int, gid: int) -> bool:
    """True when `uid` cannot start this interpreter and import the serving code on its own."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import server.cli, index.cli"], user=uid, group=gid,
                               extra_groups=[], capture_output=True, timeout=120, cwd="/")
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


def clean_environment(service_env: Mapping[str, str]) -> dict[str, str]:
    """What the container's process sees: the image's ENV (Dockerfile) and the service's environment."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1", **service_env}
