"""tests/skipguard.py in a real pytest subprocess: with FAIL_ON_SKIP=1 a skip fails the run and is
listed with its reason; without it a developer's run may still skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent

CASES = {
    "passing": "def test_ok():\n    assert True\n",
    "skipped": "import pytest\n\ndef test_ok():\n    pass\n\n"
               "def test_browser():\n    pytest.skip('chromium is not installed')\n",
    "module_skip": "import pytest\n\npytest.importorskip('no_such_module_xyz', reason='xyz is missing')\n\n"
                   "def test_never_runs():\n    pass\n",
    "xfail": "import pytest\n\n@pytest.mark.xfail(reason='known broken')\ndef test_broken():\n    assert False\n",
    "failing": "import pytest\n\ndef test_fails():\n    assert False\n\n"
               "def test_skips():\n    pytest.skip('later')\n",
}


def _run(tmp_path: Path, *cases: str, fail_on_skip: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the rootdir, not the repository
    (tmp_path / "conftest.py").write_text(
        "from skipguard import pytest_collectreport, pytest_runtest_logreport, "
        "pytest_sessionfinish, pytest_terminal_summary  # noqa: F401\n"
    )
    for case in cases:
        (tmp_path / f"test_{case}.py").write_text(CASES[case])
    env = {k: v for k, v in os.environ.items() if k != "FAIL_ON_SKIP"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the installed plugins cost seconds and play no part
    if fail_on_skip:
        env["FAIL_ON_SKIP"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_a_skip_fails_the_run_and_is_listed_with_its_reason(tmp_path: Path) -> None:
    result = _run(tmp_path, "skipped", fail_on_skip=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "test_skipped.py::test_browser: chromium is not installed" in result.stdout
    assert "1 passed, 1 skipped" in result.stdout


def test_without_the_variable_a_skip_is_allowed(tmp_path: Path) -> None:
    result = _run(tmp_path, "skipped", fail_on_skip=False)
    assert result.returncode == 0, result.stdout
    assert "did not run" not in result.stdout


def test_a_skipped_module_fails_the_run(tmp_path: Path) -> None:
    result = _run(tmp_path, "module_skip", "passing", fail_on_skip=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "test_module_skip.py: xyz is missing" in result.stdout


def test_xfail_is_no_way_out(tmp_path: Path) -> None:
    result = _run(tmp_path, "xfail", fail_on_skip=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "test_xfail.py::test_broken: xfail: known broken" in result.stdout


def test_a_run_where_everything_ran_passes(tmp_path: Path) -> None:
    result = _run(tmp_path, "passing", fail_on_skip=True)
    assert result.returncode == 0, result.stdout


def test_a_failure_keeps_its_own_status(tmp_path: Path) -> None:
    result = _run(tmp_path, "failing", fail_on_skip=True)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout
    assert "test_failing.py::test_skips: later" in result.stdout
