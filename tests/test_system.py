"""CI cannot pass with parts of the suite left out: tests/system.py (missing system components fail
under PTFT_REQUIRE_SYSTEM=1, any skip fails a CI session) and scripts/install_system_deps.sh (a
package apt cannot provide is an error naming it). Each is run for real: pytest in a subprocess on
a small test file, the install script with stand-in ``apt-get``/``apt-cache``/``id`` commands
(shims on PATH: nothing is installed, and the script believes it runs as root).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("CI", "PTFT_REQUIRE_SYSTEM", "PTFT_REQUIRE_SLURM")

SAMPLE_TESTS = '''
import pytest
from tests.system import require_system

def test_needs_pdsh():
    require_system(["pdsh"], "the pdsh tests")

def test_plain_skip():
    if {plain_skip}:
        pytest.skip("not today")

def test_fine():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
'''


def run_sample(tmp_path: Path, plain_skip: bool, **flags: str) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS.format(plain_skip=plain_skip))
    env = {k: v for k, v in os.environ.items() if k not in FLAGS}
    env.update(PYTHONPATH=str(ROOT), **flags)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.system", "-p", "no:cacheprovider", "-ra",
                           "-q", str(tmp_path / "test_sample.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_local_run_skips_a_missing_component(tmp_path):
    proc = run_sample(tmp_path, plain_skip=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 passed, 1 skipped, 1 xfailed" in out and "the pdsh tests need pdsh" in out
    assert "scripts/install_system_deps.sh" in out


@pytest.mark.parametrize("flag", ["PTFT_REQUIRE_SYSTEM", "PTFT_REQUIRE_SLURM"])
def test_required_system_turns_the_skip_into_a_failure(tmp_path, flag):
    proc = run_sample(tmp_path, plain_skip=False, **{flag: "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 2 passed, 1 xfailed" in out
    assert "FAILED test_sample.py::test_needs_pdsh" in out
    assert "PTFT_REQUIRE_SYSTEM is set but missing: pdsh; the pdsh tests need pdsh" in out


def test_any_skip_fails_a_ci_session(tmp_path):
    proc = run_sample(tmp_path, plain_skip=True, CI="true")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "skips are failures in CI" in out and "2 test(s) skipped" in out
    assert "SKIPPED test_sample.py::test_plain_skip: Skipped: not today" in out
    listed = [line for line in out.splitlines() if line.startswith("  SKIPPED ")]
    assert [line.split(":")[0] for line in listed] == ["  SKIPPED test_sample.py"] * 2  # the xfail is not a skip
    assert not any("test_expected_failure" in line for line in listed)


def test_a_ci_session_without_skips_passes(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k not in FLAGS}
    env.update(PYTHONPATH=str(ROOT), CI="true")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.system", "-p", "no:cacheprovider", "-q",
                           "test_ok.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "skips are failures" not in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- scripts/install_system_deps.sh

FAKE_PACKAGE = "ptft-test-no-such-package"


def shims(tmp_path: Path, apt_knows_fake: bool) -> tuple[Path, Path]:
    """apt-get (records its arguments, installs nothing), apt-cache (knows every package but the
    fake one unless ``apt_knows_fake``), id (says root)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt-calls.txt"
    bin_dir.mkdir()
    known = "0" if apt_knows_fake else f'$([[ "$2" == {FAKE_PACKAGE} ]] && echo 100 || echo 0)'
    scripts = {
        "apt-get": f'#!/bin/bash\necho "apt-get $*" >>{calls}\nexit 0\n',
        "apt-cache": f'#!/bin/bash\necho "apt-cache $*" >>{calls}\nexit {known}\n',
        "id": '#!/bin/bash\n[[ "$1" == -u ]] && { echo 0; exit 0; }\nexec /usr/bin/id "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, calls


def run_install_script(tmp_path: Path, apt_knows_fake: bool) -> tuple[subprocess.CompletedProcess, str]:
    """The script, with one package added to its list that no system has installed."""
    text = (ROOT / "scripts" / "install_system_deps.sh").read_text()
    anchor = "PACKAGES=(slurm-wlm "
    assert text.count(anchor) == 1, "the package list moved: update this test"
    script = tmp_path / "install_system_deps.sh"
    script.write_text(text.replace(anchor, f"PACKAGES=({FAKE_PACKAGE} slurm-wlm "))
    bin_dir, calls = shims(tmp_path, apt_knows_fake)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", PTFT_APT_UPDATE="0")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    return proc, calls.read_text() if calls.exists() else ""


def test_install_script_fails_naming_a_package_apt_cannot_provide(tmp_path):
    proc, calls = run_install_script(tmp_path, apt_knows_fake=False)
    assert proc.returncode == 1, proc.stderr
    assert f"ERROR: apt cannot provide: {FAKE_PACKAGE}" in proc.stderr
    assert f"apt-cache show {FAKE_PACKAGE}" in calls and "apt-get install" not in calls


def test_install_script_fails_when_a_package_is_still_missing_after_install(tmp_path):
    proc, calls = run_install_script(tmp_path, apt_knows_fake=True)
    assert proc.returncode == 1, proc.stderr
    assert "apt-get install" in calls and FAKE_PACKAGE in calls.split("apt-get install")[1]
    assert f"ERROR: still missing after apt-get install: {FAKE_PACKAGE}" in proc.stderr
