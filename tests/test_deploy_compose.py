"""docker-compose.yml and the API image: valid, loud about missing settings, and consistent with
what `export` writes, what the server's settings accept and what the serving code imports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from embed.spec import TRITON_DIR

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
REQUIRED = ("MODEL_DIR", "INDEX_DIR")
# the serving entry points: what the API image runs
SERVING_MODULES = ("server.app", "server.cli", "index.cli", "embed.backends.triton", "embed.backends.onnxruntime")


def _compose(tmp_path: Path, env_vars: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (Debian package `docker-compose`; `make sysdeps` installs it)")
    env = {k: v for k, v in os.environ.items() if k not in (*REQUIRED, "IMAGES_DIR")}
    env.update(env_vars)
    # a copy in an empty project directory: no stray .env next to it changes the outcome
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    return subprocess.run(
        [exe, "-f", "docker-compose.yml", "config", "-q"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )


def _mounts(volumes: list[str]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume, `${...}` kept whole in the source."""
    out = []
    for v in volumes:
        variables = re.findall(r"\$\{[^}]*\}", v)
        parts = re.sub(r"\$\{[^}]*\}", "\0", v).split(":")
        source = parts[0]
        for var in variables:
            source = source.replace("\0", var, 1)
        out.append((source, parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def _load() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the compose file")
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_config_is_valid(tmp_path: Path) -> None:
    result = _compose(tmp_path, {"MODEL_DIR": str(tmp_path / "model"), "INDEX_DIR": str(tmp_path / "index")})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", REQUIRED)
def test_compose_fails_loudly_without_a_required_setting(tmp_path: Path, missing: str) -> None:
    env = {name: str(tmp_path / name.lower()) for name in REQUIRED if name != missing}
    result = _compose(tmp_path, env)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_triton_service_serves_the_export_repository() -> None:
    triton = _load()["services"]["triton"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\$\{TRITON_RELEASE:-\d\d\.\d\d\}-py3", triton["image"])
    repo = next(a.split("=", 1)[1] for a in triton["command"] if a.startswith("--model-repository="))
    mounts = [m for m in _mounts(triton["volumes"]) if m[0].startswith("${MODEL_DIR")]
    # <MODEL_DIR>/triton (export's TRITON_DIR) mounted read-only where --model-repository points
    assert [(src.split("}", 1)[1], dst, mode) for src, dst, mode in mounts] == [(f"/{TRITON_DIR}", repo, "ro")]
    published = {p.rsplit(":", 1)[1] for p in triton["ports"]}
    assert published == {"8000", "8001", "8002"}
    assert "http://localhost:8000/v2/health/ready" in triton["healthcheck"]["test"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"


def test_api_service_settings_agree_with_the_server(tmp_path: Path) -> None:
    services = _load()["services"]
    api, env = services["api"], services["api"]["environment"]
    assert api["depends_on"]["triton"]["condition"] == "service_healthy"
    assert env["SIMSEARCH_TRITON_URL"] == "triton:8001" and env["SIMSEARCH_TRITON_PROTOCOL"] == "grpc"
    mounts = {target: (source, mode) for source, target, mode in _mounts(api["volumes"])}
    assert mounts[env["SIMSEARCH_INDEX_DIR"]][0].startswith("${INDEX_DIR:?")
    port = env["SIMSEARCH_PORT"]
    assert any(p.endswith(f":{port}") for p in api["ports"])
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(api["healthcheck"]["test"])
    settings_mod = pytest.importorskip("server.settings")
    # every variable is one the server knows (it rejects unknown SIMSEARCH_* names), and they build
    # a Triton-backed configuration
    values = {k.removeprefix("SIMSEARCH_").lower(): v for k, v in env.items() if k.startswith("SIMSEARCH_")}
    assert set(values) <= set(settings_mod.Settings.model_fields)
    values["index_dir"] = str(tmp_path / "index")
    values["log_level"] = "info"
    settings = settings_mod.Settings(**values)
    assert settings.backend_name == "triton" and settings.triton_url == "triton:8001"


def test_indexer_is_a_one_shot_profile_through_triton() -> None:
    indexer = _load()["services"]["indexer"]
    assert indexer["profiles"] == ["indexer"] and indexer["restart"] == "no"
    assert indexer["depends_on"]["triton"]["condition"] == "service_healthy"
    script = " ".join(indexer["command"])
    assert "simsearch index build /images --triton-url triton:8001 --out /index" in script
    mounts = {target: (source, mode) for source, target, mode in _mounts(indexer["volumes"])}
    assert mounts["/images"] == ("${IMAGES_DIR:-/dev/null}", "ro")
    assert mounts["/index"][0].startswith("${INDEX_DIR:?")


def _extras() -> tuple[list[str], dict[str, list[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def test_serving_install_has_no_torch() -> None:
    base, extras = _extras()
    serving = {_name(r) for r in base + extras["serve"] + extras["cpu"]}
    assert not serving & {"torch", "torchvision", "onnx", "onnxscript", "tensorboard"}
    assert {"tritonclient", "fastapi", "onnxruntime", "faiss-cpu"} <= serving
    assert "pip install '.[serve,cpu]'" in DOCKERFILE.read_text()


def test_image_copies_every_package_serving_imports() -> None:
    """The Dockerfile copies only some packages: each one the serving entry points import must be in it."""
    code = (
        "import importlib, importlib.util, sys\n"
        f"mods = [m for m in {SERVING_MODULES!r} if importlib.util.find_spec(m) is not None]\n"
        "for m in mods: importlib.import_module(m)\n"
        f"root = {str(ROOT)!r}\n"
        "print(' '.join(sorted({n.split('.')[0] for n, m in list(sys.modules.items())\n"
        "    if (getattr(m, '__file__', None) or '').startswith(root + '/') and '.venv' not in m.__file__})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    packages = out.stdout.split()
    assert "server" in packages and "embed" in packages
    copied = set(re.findall(r"^COPY (\w+) \./\1$", DOCKERFILE.read_text(), flags=re.M))
    assert set(packages) <= copied, f"the image lacks {sorted(set(packages) - copied)}"


def test_indexer_refuses_to_run_without_images_dir() -> None:
    """An unset IMAGES_DIR would index an empty folder and drop every item: the guard stops first."""
    script = _load()["services"]["indexer"]["command"][0].replace("$$", "$")
    result = subprocess.run(["sh", "-c", script], env={"IMAGES_DIR_GIVEN": "", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2 and "set IMAGES_DIR" in result.stderr
