"""Run a command as in a virtual environment that `make demo` alone set up.

`make demo` installs the Makefile's DEMO_EXTRAS; `make test` adds TEST_EXTRAS (`triton`, `dev`).
`test_only_modules()` lists the top-level modules of every distribution the test extras bring in
(transitively) that the base dependencies and the demo extras do not, and `run_without()` runs
`python -m MODULE ARGS` with those modules unimportable, so a demo that reaches for pytest, PyYAML
or nvidia-pytriton fails here rather than on a user's machine where they are not installed.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Runs `python -m MODULE ARGS` with the listed top-level modules invisible to every import finder,
# so they behave exactly as uninstalled ones: `import x` raises ModuleNotFoundError and
# `importlib.util.find_spec("x")` is None (torch probes optional packages that way).
RUN_WITHOUT = """
import importlib, importlib.abc, runpy, sys

blocked = set(filter(None, sys.argv[1].split(",")))

class Hide(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            return None
        return self.inner.find_spec(name, path, target)

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()

preloaded = sorted(blocked & {m.split(".")[0] for m in sys.modules})
if preloaded:
    sys.exit(f"cannot block {preloaded}: imported at start-up already")
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
if sys.argv[2] == "--import":  # import each module named after it, in this one interpreter
    for name in sys.argv[3:]:
        importlib.import_module(name)
    print("imported", *sys.argv[3:])
else:
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def makefile_extras(variable: str) -> list[str]:
    """The extras a Makefile variable (DEMO_EXTRAS, TEST_EXTRAS) names."""
    match = re.search(rf"^{variable}\s*\??=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    if match is None:
        raise LookupError(f"the Makefile sets no {variable}")
    return match.group(1).split(",")


def _requirements(extras: Iterable[str], *, base: bool) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]] if base else []
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _closure(reqs: Iterable[Requirement]) -> set[str]:
    """The installed distributions these requirements pull in, transitively (canonical names)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(reqs)
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            sub = Requirement(text)
            envs: list[dict[str, Any]] = [{"extra": e} for e in (req.extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append(sub)
    return {name for name, _ in seen}


@functools.cache
def test_only_modules() -> tuple[str, ...]:
    """Top-level modules of what `make test` installs and `make demo` does not."""
    demo = _closure(_requirements(makefile_extras("DEMO_EXTRAS"), base=True))
    extra = _closure(_requirements(makefile_extras("TEST_EXTRAS"), base=False)) - demo
    # a namespace package that a demo distribution also fills (opentelemetry: fastapi's -api and
    # ray's -sdk; google) is the demo's too
    modules = {
        module
        for module, dists in metadata.packages_distributions().items()
        if any(canonicalize_name(d) in extra for d in dists) and module.isidentifier()
        and not any(canonicalize_name(d) in demo for d in dists)
    }
    return tuple(sorted(modules))


test_only_modules.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


def run_without(
    modules: Iterable[str], module: str, args: list[str], **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """`python -m module args` with `modules` unimportable (module "--import": import each of `args`);
    kwargs go to subprocess.run."""
    return subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, ",".join(modules), module, *args],
        cwd=kwargs.pop("cwd", ROOT), capture_output=True, text=True, **kwargs,
    )


def popen_without(modules: Iterable[str], module: str, args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    """The same as `run_without`, started in the background."""
    return subprocess.Popen(
        [sys.executable, "-c", RUN_WITHOUT, ",".join(modules), module, *args], text=True, **kwargs
    )
