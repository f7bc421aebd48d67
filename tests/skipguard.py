"""A skipped test fails the run when FAIL_ON_SKIP=1 (what `make test`, and so CI, sets).

Tests skip, saying why, where something they need is missing (Chromium, docker-compose, the bundled
tritonserver). That is right for a developer running pytest by hand and wrong for CI: a green run
must mean every test ran. With FAIL_ON_SKIP=1 the session's exit status turns non-zero when any
test or test module was skipped or xfailed, and the summary lists each one with its reason.
Loaded by tests/conftest.py (its hooks are imported there).
"""

from __future__ import annotations

import os

import pytest

ENV_VAR = "FAIL_ON_SKIP"
_skipped: list[tuple[str, str]] = []  # (test or module id, reason)


def _enabled() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    if getattr(report, "wasxfail", None) is not None:
        return f"xfail: {report.wasxfail or 'no reason given'}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a module-level skip or importorskip: every test in it is lost
        _skipped.append((report.nodeid, _reason(report)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # xfail counts too: a test marked to fail proves nothing in CI
    if report.skipped or (report.passed and getattr(report, "wasxfail", None) is not None):
        _skipped.append((report.nodeid, _reason(report)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not (_enabled() and _skipped):
        return
    terminalreporter.section(f"{ENV_VAR}: {len(_skipped)} test(s) did not run", sep="=", red=True)
    for nodeid, reason in _skipped:
        terminalreporter.line(f"SKIPPED {nodeid}: {reason}")
    terminalreporter.line(f"every test must run under {ENV_VAR}=1 (make test, .ci/run); install what they need")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _enabled() and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
