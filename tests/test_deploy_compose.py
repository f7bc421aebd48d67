"""docker-compose.yml and the API image: valid, loud about missing settings, and consistent with
what `export` writes, what the server's settings accept and what the serving code imports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomllib
from composekit import Containers, as_user, clean_environment, needs_read_capability, service_user

from embed.spec import TRITON_DIR

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
REQUIRED = ("MODEL_DIR", "INDEX_DIR", "SIMSEARCH_API_KEY")
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
    result = _compose(tmp_path, {name: str(tmp_path / name.lower()) for name in REQUIRED})
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


# The deployment run for real, without Docker: the indexer's and then the api's command from
# docker-compose.yml with their environment and volumes (tests/composekit.py: container paths stay
# container paths, each service sees only what it mounts), as the compose `user:` (uid 10001), with
# a real local Triton standing for the `triton` service. The index directory is pre-created empty
# inside a folder that user cannot write, as a volume mount is (`/index`, parent `/`).
KEY_FOR_TEST = "compose-test-key-4f1c"


def _start_triton(model_dir: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`simsearch triton` (the bundled tritonserver, Python backend) for the `triton` service. It runs
    as the test's user (root), as the compose service runs as its image's default user."""
    from serverkit import free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(work / "triton.out", "wb")  # noqa: SIM115 (closed by the child's exit)
    proc = subprocess.Popen(
        [sys.executable, "-m", "simsearch", "triton", "--model", str(model_dir), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1", "--work-dir", str(work / "triton")],
        cwd=work, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return proc, f"127.0.0.1:{grpc}"
        except OSError:
            pass
        time.sleep(0.3)
    _stop(proc)
    raise RuntimeError(f"local Triton not ready: {(work / 'triton.out').read_text()[-3000:]}")


def _host_tree(base: Path, model_dir: Path, uid: int, gid: int) -> dict[str, str]:
    """The host side: the images, an empty index directory owned by the user inside `host/`, which
    the user cannot write. Returns compose's environment."""
    images = base / "images"
    for cls_dir in sorted((ROOT / "tests" / "data" / "cifar10-sample" / "test").iterdir())[:5]:
        (images / cls_dir.name).mkdir(parents=True)
        for p in sorted(cls_dir.glob("*.jpg"))[:3]:
            shutil.copy(p, images / cls_dir.name / p.name)
    (base / "host" / "index").mkdir(parents=True)
    os.chown(base / "host" / "index", uid, gid)  # `mkdir -p "$INDEX_DIR"` by the APP_UID user
    for d in (base, base / "host"):
        os.chmod(d, 0o755)
    return {"MODEL_DIR": str(model_dir), "INDEX_DIR": str(base / "host" / "index"),
            "IMAGES_DIR": str(images), "SIMSEARCH_API_KEY": KEY_FOR_TEST}


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"api exited with {proc.returncode}: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"api not ready after {timeout_s} s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def _check_api(url: str, images: Path) -> None:
    """Search, every thumbnail the page's grid asks for, and writes that need the key."""
    import httpx

    with httpx.Client(base_url=url, timeout=30) as c:
        assert "item.thumbnail_url" in c.get("/static/common.js").text  # what the grid's <img> asks
        query = images / "cat" / "0000.jpg"
        r = c.post("/v1/search", files={"file": ("q.jpg", query.read_bytes())}, data={"k": "15"})
        assert r.status_code == 200, r.text
        hits = r.json()["neighbours"]
        assert len(hits) == 15 and hits[0]["path"] == "cat/0000.jpg" and hits[0]["score"] > 0.999
        for hit in hits:
            t = c.get(hit["thumbnail_url"])
            assert t.status_code == 200 and t.content[:2] == b"\xff\xd8", (hit["path"], t.text)
        upload = {"file": ("new.jpg", (images / "bird" / "0001.jpg").read_bytes())}
        assert c.post("/v1/items", files=upload).status_code == 401
        assert c.post("/v1/items", files=upload, headers={"X-API-Key": "wrong"}).status_code == 401
        r = c.post("/v1/items", files=upload, headers={"X-API-Key": KEY_FOR_TEST})
        assert r.status_code == 201, r.text
        item = r.json()["item"]
        assert c.get(item["thumbnail_url"]).status_code == 200  # uploads keep their thumbnails
        assert c.delete(f"/v1/items/{item['id']}").status_code == 401
        assert c.delete(f"/v1/items/{item['id']}", headers={"X-API-Key": KEY_FOR_TEST}).status_code == 200


@pytest.fixture(scope="module")
def compose_triton(model_dir: Path) -> Iterator[tuple[Path, str]]:
    """A copy of the model readable by the services' user, and the gRPC address of a local Triton serving it."""
    if os.geteuid() != 0:
        pytest.skip("runs the services as the compose user: needs root (CI runs the suite as root)")
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    work = Path(tempfile.mkdtemp(prefix="simsearch-compose-triton-"))
    try:
        os.chmod(work, 0o755)
        shutil.copytree(model_dir, work / "model")  # model_dir's parents are private to root (pytest tmp)
        triton, grpc = _start_triton(work / "model", work)
        try:
            yield work / "model", grpc
        finally:
            _stop(triton)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _serve(containers: Containers, prefix: list[str], base: Path, check: Callable[[str], None]) -> None:
    """The api service's command until `check(url)` returns, then a clean stop."""
    from serverkit import free_port

    api = containers.service("api")
    port = free_port()  # stands for the published port
    log = base / "api.log"
    with containers.mounted(api), open(log, "ab") as out:
        proc = subprocess.Popen([*prefix, *api.argv], cwd=base, stdout=out, stderr=subprocess.STDOUT,
                                env=clean_environment({**api.environment, "SIMSEARCH_PORT": str(port)}))
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc, log)
            check(f"http://127.0.0.1:{port}")
        finally:
            # uvicorn re-raises SIGTERM once its clean shutdown is done
            assert _stop(proc) in (0, -signal.SIGTERM), log.read_text()[-3000:]


def _index(containers: Containers, prefix: list[str], base: Path) -> dict:
    indexer = containers.service("indexer")
    with containers.mounted(indexer):
        run = subprocess.run([*prefix, *indexer.argv], cwd=base, env=clean_environment(indexer.environment),
                             capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def _wait_items(url: str, n: int, timeout_s: float = 10) -> float:
    """Seconds until the API's index holds `n` items (/readyz reports them)."""
    import httpx

    t0 = time.monotonic()
    while (items := httpx.get(f"{url}/readyz", timeout=5).json().get("items")) != n:
        assert time.monotonic() - t0 < timeout_s, f"the api holds {items} items, not {n}, after {timeout_s} s"
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("api_first", [False, True], ids=["indexer-then-api", "up-then-indexer"])
def test_compose_services_run_as_their_user(compose_triton: tuple[Path, str], api_first: bool) -> None:
    """indexer-then-api: the issue's order. up-then-indexer: docs/deploy.md's quick start, where the
    API creates the index (compose's first step) and, still running, picks up the indexer's items."""
    model, triton_grpc = compose_triton
    compose = _load()
    base = Path(tempfile.mkdtemp(prefix="simsearch-compose-"))
    try:
        uid, gid = service_user(compose, "api", {})
        env = _host_tree(base, model, uid, gid)
        prefix = as_user(uid, gid, read_capability=needs_read_capability(uid, gid))
        host, ctr = base / "host", base / "ctr"
        probe = subprocess.run([*prefix, "sh", "-c", f"touch {host}/probe"], capture_output=True, timeout=30)
        assert probe.returncode != 0 and not (host / "probe").exists(), "the user can write the index's parent"
        containers = Containers(compose, env, ctr, {"triton:8001": triton_grpc})
        assert service_user(compose, "indexer", env) == (uid, gid)
        images = Path(env["IMAGES_DIR"])

        def index() -> None:
            summary = _index(containers, prefix, base)
            assert summary["added"] == 15 and not summary["failed"], summary
            assert sorted(p.name for p in host.iterdir()) == ["index"]  # nothing written beside it
            assert all(p.stat().st_uid == uid for p in (host / "index").iterdir())

        def up_then_index(url: str) -> None:
            assert (host / "index" / "index.sqlite").stat().st_uid == uid  # created by the API, in place
            index()
            _wait_items(url, 15)  # no restart
            _check_api(url, images)

        if api_first:
            _serve(containers, prefix, base, up_then_index)
        else:
            index()
            assert not list(ctr.iterdir())  # nothing written at the container's top level either
            _serve(containers, prefix, base, lambda url: _check_api(url, images))
        assert sorted(p.name for p in host.iterdir()) == ["index"]

        # the same api command on 0.0.0.0 without a key refuses to start, in one line
        api = containers.service("api")
        open_env = clean_environment({k: v for k, v in api.environment.items() if k != "SIMSEARCH_API_KEY"})
        with containers.mounted(api):
            refused = subprocess.run([*prefix, *api.argv], cwd=base, env=open_env, capture_output=True, text=True,
                                     timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "SIMSEARCH_API_KEY" in refused.stderr
        assert "0.0.0.0" in refused.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
