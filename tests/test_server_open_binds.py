"""Writes closed by default off loopback, and thumbnails found where the API sees the images: the
two settings the compose deployment relies on (docker-compose.yml sets SIMSEARCH_API_KEY and
SIMSEARCH_IMAGES_DIR), tested on the server itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_binds_start_without_a_key(host: str, tmp_path: Path) -> None:
    from server.auth import open_writes_refusal
    from server.settings import Settings

    settings = Settings(triton_url="t:1", index_dir=tmp_path, host=host, _env_file=None)
    assert open_writes_refusal(settings) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_other_binds_need_a_key_or_an_explicit_override(host: str, tmp_path: Path) -> None:
    from server.auth import open_writes_refusal
    from server.settings import Settings

    refusal = open_writes_refusal(Settings(triton_url="t:1", index_dir=tmp_path, host=host, _env_file=None))
    assert refusal is not None and host in refusal and "SIMSEARCH_API_KEY" in refusal
    assert "SIMSEARCH_ALLOW_OPEN_WRITES=1" in refusal
    for extra in ({"api_key": "k"}, {"allow_open_writes": True}):
        assert open_writes_refusal(Settings(triton_url="t:1", index_dir=tmp_path, host=host, _env_file=None,
                                            **extra)) is None


def test_serve_refuses_an_open_bind_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    for k in [k for k in os.environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("SIMSEARCH_HOST", "0.0.0.0")
    assert main(["--triton-url", "127.0.0.1:1", "--index", str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refusing to listen on 0.0.0.0 without an API key" in err
    assert not (tmp_path / "index").exists()  # refused before anything was opened
    monkeypatch.setenv("SIMSEARCH_API_KEY", " ")
    assert main(["--triton-url", "127.0.0.1:1", "--index", str(tmp_path / "index")]) == 2
    assert "api_key is empty" in capsys.readouterr().err


def test_serve_refuses_a_wrong_model_directory_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    for k in [k for k in os.environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    for wrong in (tmp_path / "no-such-model", tmp_path):  # a mistyped path; a folder that is not a model
        assert main(["--model", str(wrong), "--index", str(tmp_path / "index")]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"simsearch serve: error: {wrong} is not a model directory: "
                                            "model.json is missing"]
    assert not (tmp_path / "index").exists()  # refused before anything was opened


def test_images_dir_resolves_folder_items_indexed_elsewhere(model_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The API runs where the indexed folder has another path: SIMSEARCH_IMAGES_DIR finds the files."""
    from fastapi.testclient import TestClient

    from index.cli import main as index_main
    from server.app import create_app
    from server.settings import Settings

    for k in [k for k in os.environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    where_indexed = tmp_path / "indexer-view"
    for p in sorted((ROOT / "tests" / "data" / "cifar10-sample" / "test" / "dog").glob("*.jpg"))[:3]:
        (where_indexed / "dog").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, where_indexed / "dog" / p.name)
    assert index_main(["build", str(where_indexed), "--model", str(model_dir), "--out", str(tmp_path / "index"),
                       "--no-progress"]) == 0
    where_served = tmp_path / "api-view"
    where_indexed.rename(where_served)  # the recorded root no longer holds the files

    def thumbnail_statuses(**kw: object) -> list[int]:
        app = create_app(Settings(model_dir=model_dir, index_dir=tmp_path / "index", _env_file=None, **kw))
        with TestClient(app) as c:
            hits = c.post("/v1/search", json={"id": 1, "k": 10}).json()["neighbours"]
            assert {h["path"] for h in hits} == {f"dog/{p.name}" for p in (where_served / "dog").iterdir()}
            return [c.get(h["thumbnail_url"]).status_code for h in hits]

    assert thumbnail_statuses() == [404] * 3
    assert thumbnail_statuses(images_dir=where_served) == [200] * 3
