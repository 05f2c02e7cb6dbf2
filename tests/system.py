"""What the suite may skip, and when it may not.

Tests that need a system component (SLURM, OpenMPI, sshd, pdsh, network namespaces, root) call
:func:`require_system`. A plain local ``pytest`` skips them with the install hint; with
``PTFT_REQUIRE_SYSTEM=1`` (set by scripts/test.sh, i.e. CI; the older ``PTFT_REQUIRE_SLURM=1``
counts too) the same call fails the test, naming the missing component, so CI cannot pass
with the multi-process and multi-host paths silently left out.

Also a session rule (hooks re-exported by tests/conftest.py): when ``CI`` is true or
``PTFT_REQUIRE_SYSTEM`` is set, a session with any skipped test fails, listing them. A skip in
CI is a promise that was not checked.
"""

from __future__ import annotations

import os

import pytest

INSTALL_HINT = "scripts/install_system_deps.sh"
_TRUE = ("1", "true", "yes", "on")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def system_required() -> bool:
    """True in CI: missing system components are failures, not skips."""
    return _flag("PTFT_REQUIRE_SYSTEM") or _flag("PTFT_REQUIRE_SLURM")


def skips_forbidden() -> bool:
    return _flag("CI") or system_required()


def require_system(missing: list[str] | tuple[str, ...], what: str) -> None:
    """Skip (locally) or fail (``PTFT_REQUIRE_SYSTEM=1``) when ``missing`` is not empty.

    ``missing`` names the absent components (binaries, "root", ...); ``what`` says which tests
    need them.
    """
    if not missing:
        return
    reason = f"{what} need {', '.join(missing)} (install: {INSTALL_HINT}, run as root)"
    if system_required():
        pytest.fail(f"PTFT_REQUIRE_SYSTEM is set but missing: {', '.join(missing)}; {reason}", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------- no skips in CI

_skipped: list[str] = []  # "nodeid: reason" of this session's skips


def _record(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_configure(config: pytest.Config) -> None:
    _skipped.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _record(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped and skips_forbidden() and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _skipped and skips_forbidden():
        terminalreporter.section("skips are failures in CI", sep="=", red=True, bold=True)
        terminalreporter.write_line(
            f"{len(_skipped)} test(s) skipped while CI/PTFT_REQUIRE_SYSTEM is set; every test must run in CI:")
        for line in _skipped:
            terminalreporter.write_line(f"  SKIPPED {line}")
