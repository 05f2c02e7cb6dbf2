"""The refusal contract every test in this folder checks (docs/refusals.md; docs/design.md, guarantees 7, 9).

A mistake a user can type ends in exactly one ``ptft: error: ...`` line on stderr, exit status 2,
no traceback; the test then checks that nothing was deleted or half-written.
"""

from __future__ import annotations

from pathlib import Path

from ptft_dist.cli import main


def refused(capsys, *argv: object) -> str:
    """Run ``ptft ARGV`` in this process; assert the refusal contract; return the error line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ptft: error:")]
    assert rc == 2, f"exit {rc}, stderr:\n{err}"
    assert len(errors) == 1, f"expected one error line, stderr:\n{err}"
    assert err.rstrip().splitlines()[-1] == errors[0], f"the error line is not the last line:\n{err}"
    assert "Traceback" not in err
    return errors[0]


def accepted(capsys, *argv: object) -> str:
    """Run ``ptft ARGV``; assert exit 0; return stderr (the log)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 0, f"exit {rc}, stderr:\n{captured.err}"
    return captured.err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes: compare before and after to prove nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
