"""Checkpoints (ptft_dist/checkpoint/manager.py, preemption.py): whole-or-invisible saves, atomic latest, keep-last-K,
resume resolution, stale-dir cleanup, RNG, preemption signals. In-process tests use a tiny fake
engine; the distributed ones run real DeepSpeed ranks over gloo (ENOSPC on one rank, SIGUSR1 to
one rank, kill -9 during a save) and check the numbers after resuming."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ptft_dist.checkpoint.manager import (
    COMPLETE,
    CheckpointError,
    CheckpointManager,
    capture_rng,
    find_checkpoint,
    restore_rng,
)
from ptft_dist.checkpoint.preemption import PreemptionHandler
from ptft_dist.config import CheckpointConfig
from tests.dist_scripts.common import spawn_ranks

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "tests" / "dist_scripts" / "ckpt_job.py"


class FakeEngine:
    """Writes one file per checkpoint, like an engine with a single rank; can fail mid-write."""

    def __init__(self, fail_at: int | None = None):
        self.w = torch.arange(4.0)
        self.fail_at = fail_at

    def save_checkpoint(self, ckpt_dir, tag, client_state):
        p = Path(ckpt_dir) / tag / "model_states.pt"
        if self.fail_at is not None and tag == f"step_{self.fail_at}":
            p.write_bytes(b"partial")
            raise OSError(28, "No space left on device", str(p))
        torch.save({"w": self.w.clone(), "client": client_state}, p)
        return [p]

    def load_checkpoint(self, ckpt_dir, tag):
        blob = torch.load(Path(ckpt_dir) / tag / "model_states.pt", weights_only=False)
        self.w = blob["w"]
        return dict(blob["client"])


def mgr(tmp_path, **kw) -> CheckpointManager:
    return CheckpointManager(tmp_path / "run", CheckpointConfig(**kw), rank=0, world_size=1)


def test_save_writes_manifest_then_latest_and_prunes(tmp_path):
    m, e = mgr(tmp_path, keep_last=2), FakeEngine()
    for step in (2, 4, 6, 8):
        e.w += 1
        path = m.save(e, step, {"data": {"consumed": step * 10}})
        assert path == tmp_path / "run" / "checkpoints" / f"step_{step}"
        assert m.latest_tag() == f"step_{step}"
        manifest = json.loads((path / COMPLETE).read_text())
        assert manifest["step"] == step and manifest["world_size"] == 1
        assert set(manifest["files"]) == {"model_states.pt", "rng_state_0.pt"}
        assert all(size > 0 for size in manifest["files"].values())
    assert [s for s, _ in m.checkpoints()] == [6, 8]  # keep_last=2
    assert not list(m.root.glob(".*"))  # no temp/trash files left
    e2 = FakeEngine()
    client = m.load(e2, m.resolve_resume())
    assert torch.equal(e2.w, e.w) and client["data"] == {"consumed": 80} and client["step"] == 8
    assert client["world_size"] == 1 and client["rng"]["torch"] is not None
    assert m.save(e, 8, {}) == m.latest_path()  # saving the same step again: no-op


def test_keep_last_never_deletes_latest_and_zero_keeps_all(tmp_path):
    m, e = mgr(tmp_path, keep_last=1), FakeEngine()
    m.save(e, 1, {})
    m.save(e, 2, {})
    assert [s for s, _ in m.checkpoints()] == [2]
    m2, e2 = mgr(tmp_path / "b", keep_last=0), FakeEngine()
    for s in (1, 2, 3):
        m2.save(e2, s, {})
    assert [s for s, _ in m2.checkpoints()] == [1, 2, 3]


def test_write_error_keeps_previous_latest_and_removes_partial_dir(tmp_path):
    m, e = mgr(tmp_path), FakeEngine(fail_at=4)
    m.save(e, 2, {})
    with pytest.raises(CheckpointError, match=r"step_4 failed on rank\(s\) 0.*No space left.*latest is still step_2"):
        m.save(e, 4, {})
    assert m.latest_tag() == "step_2" and not (m.root / "step_4").exists()
    e.fail_at = None
    m.save(e, 4, {})  # space freed: the next save works
    assert m.latest_tag() == "step_4"


def test_failed_latest_rename_leaves_old_latest(tmp_path, monkeypatch):
    m, e = mgr(tmp_path), FakeEngine()
    m.save(e, 2, {})
    real = os.replace

    def boom(src, dst):
        if str(dst).endswith("latest"):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointError, match="sealing failed.*Input/output error.*latest is still step_2"):
        m.save(e, 4, {})
    monkeypatch.setattr(os, "replace", real)
    assert m.latest_tag() == "step_2" and not (m.root / "step_4").exists()
    assert not [p for p in m.root.iterdir() if p.name.startswith(".latest")]


def test_resolve_resume_modes(tmp_path):
    m, e = mgr(tmp_path, resume="auto"), FakeEngine()
    assert m.resolve_resume() is None  # fresh run dir
    m.save(e, 3, {})
    assert m.resolve_resume() == m.root / "step_3"
    with pytest.raises(CheckpointError, match="resume=never but .* already holds checkpoints"):
        mgr(tmp_path, resume="never").resolve_resume()
    assert mgr(tmp_path / "other", resume="never").resolve_resume() is None
    for target in (m.root / "step_3", tmp_path / "run", m.root):  # a checkpoint, a run dir, a checkpoints dir
        assert mgr(tmp_path / "x", resume=str(target)).resolve_resume() == m.root / "step_3"
    with pytest.raises(CheckpointError, match="checkpoint.resume: .* no such checkpoint or run directory"):
        mgr(tmp_path / "x", resume=str(tmp_path / "missing")).resolve_resume()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        mgr(tmp_path / "x", resume=str(tmp_path / "empty")).resolve_resume()
    (m.root / "step_3" / "model_states.pt").write_bytes(b"x")  # size no longer matches the manifest
    with pytest.raises(CheckpointError, match="damaged: model_states.pt has 1 bytes"):
        m.resolve_resume()


def test_find_checkpoint_follows_latest_from_run_checkpoints_or_step_dir(tmp_path):
    """The one answer to "where is the latest checkpoint" (resume and ``ptft convert`` both use it)."""
    m, e = mgr(tmp_path), FakeEngine()
    m.save(e, 2, {})
    m.save(e, 4, {})
    for target in (tmp_path / "run", m.root, m.root / "step_4"):
        assert find_checkpoint(target) == m.root / "step_4"
    assert find_checkpoint(m.root / "step_2") == m.root / "step_2"  # a step dir is taken as given
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        find_checkpoint(tmp_path / "missing")
    (m.root / "latest").unlink()
    for target in (tmp_path / "run", m.root):
        with pytest.raises(CheckpointError, match="not a checkpoint: no 'latest' file"):
            find_checkpoint(target)
    (m.root / "latest").write_text("step_9")
    with pytest.raises(CheckpointError, match="names step_9, which does not exist"):
        find_checkpoint(tmp_path / "run")


def test_interrupted_save_dirs_are_removed_on_resume(tmp_path):
    m, e = mgr(tmp_path), FakeEngine()
    m.save(e, 4, {})
    # what a kill -9 during the saves of steps 6 and 8 leaves: dirs without COMPLETE, latest unmoved
    for s in (6, 8):
        (m.root / f"step_{s}").mkdir()
        (m.root / f"step_{s}" / "model_states.pt").write_bytes(b"half")
    (m.root / "step_2").mkdir()  # an old incomplete one (failed cleanup)
    (m.root / ".latest.tmp123").write_text("step_8")
    assert m.resolve_resume() == m.root / "step_4"
    assert sorted(p.name for p in m.root.iterdir()) == ["latest", "step_4"]
    m.save(e, 6, {})
    assert m.latest_tag() == "step_6"


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_complete_checkpoints_without_latest_are_refused_not_deleted(tmp_path, mode):
    """A user who deleted ``latest`` (or copied the step dirs without it) must not lose them: the
    resume is refused with the path to pass, and every checkpoint stays on disk."""
    m, e = mgr(tmp_path), FakeEngine()
    for s in (2, 4):
        m.save(e, s, {})
    (m.root / "latest").unlink()
    (m.root / "step_6").mkdir()  # an interrupted save beside them
    m.cfg.resume = mode
    with pytest.raises(CheckpointError, match=r"no 'latest'.*checkpoint.resume=.*step_4"):
        m.resolve_resume()
    assert (m.root / "step_2" / "COMPLETE").is_file() and (m.root / "step_4" / "COMPLETE").is_file()
    m.cfg.resume = str(m.root / "step_4")
    assert m.resolve_resume() == m.root / "step_4"


def test_latest_pointing_nowhere_is_an_error(tmp_path):
    m = mgr(tmp_path)
    m.root.mkdir(parents=True)
    (m.root / "latest").write_text("step_9")
    with pytest.raises(CheckpointError, match="names step_9, which does not exist"):
        m.resolve_resume()


def test_rng_roundtrip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = {"rng": capture_rng()}
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    assert restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    assert restore_rng({"rng": None}) is False


def test_preemption_handler_only_sets_a_flag():
    with PreemptionHandler() as pre:
        assert not pre.requested and not pre.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert pre.requested and pre.received == signal.SIGUSR1 and pre.should_stop()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored


# --------------------------------------------------------------------------- multi-process runs


def _wait(procs, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1.0, deadline - time.time())))
        except Exception:
            for q in procs:
                q.kill()
            raise
    return codes


def _logs(d: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(d.glob("*.log")))


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
    """2 DeepSpeed ZeRO-2 ranks: checkpoint every 2 steps; rank 1's writes of step_4 fail with ENOSPC;
    after step 7 the test sends SIGUSR1 to rank 1 only."""
    d = tmp_path_factory.mktemp("preempt")
    out, run = d / "out", d / "run"
    procs = spawn_ranks(JOB, [str(run), str(out), "--fail-step", "4", "--sleep", "0.3"], 2, d / "logs")
    deadline = time.time() + 240
    progress = [out / f"progress_rank{r}" for r in (0, 1)]
    while time.time() < deadline:
        if all(p.is_file() and p.read_text() and int(p.read_text()) >= 7 for p in progress):
            break
        if any(p.poll() is not None for p in procs):
            pytest.fail("a rank exited early:\n" + _logs(d / "logs"))
        time.sleep(0.1)
    else:
        for p in procs:
            p.kill()
        pytest.fail("ranks did not reach step 7:\n" + _logs(d / "logs"))
    procs[1].send_signal(signal.SIGUSR1)
    codes = _wait(procs, 120)
    results = [json.loads((out / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    return d, codes, results


@pytest.mark.distributed
def test_disk_full_on_one_rank_keeps_previous_latest(preempted_run):
    _, _, results = preempted_run
    for r in results:
        (err,) = r["save_errors"]  # both ranks learned about rank 1's failure
        assert err["step"] == 4 and err["latest"] == "step_2" and err["dir_exists"] is False
        assert "failed on rank(s) 1" in err["error"] and "No space left on device" in err["error"]
        assert "latest is still step_2" in err["error"]
        assert r["saved"][:2] == [2, 6]  # and the next checkpoint worked


@pytest.mark.distributed
def test_signal_to_one_rank_stops_all_at_the_same_step(preempted_run):
    d, codes, (r0, r1) = preempted_run
    assert codes == [124, 124]  # checkpoint.requeue_exit_code
    assert r1["got_signal"] == signal.SIGUSR1 and r0["got_signal"] == -1  # rank 0 learned it by all-reduce
    assert r0["stopped_at"] == r1["stopped_at"] >= 7
    n = r0["stopped_at"]
    root = d / "run" / "checkpoints"
    assert (root / "latest").read_text() == f"step_{n}" and (root / f"step_{n}" / COMPLETE).is_file()
    manifest = json.loads((root / f"step_{n}" / COMPLETE).read_text())
    assert {"rng_state_0.pt", "rng_state_1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(manifest["files"])
    # resume (same world size): continues at step n, the first loss equals the one the stopped run saw
    out2 = d / "out2"
    procs = spawn_ranks(JOB, [str(d / "run"), str(out2), "--max-steps", str(n + 2)], 2, d / "logs2")
    assert _wait(procs, 180) == [0, 0], _logs(d / "logs2")
    for r, old in ((0, r0), (1, r1)):
        res = json.loads((out2 / f"result_rank{r}.json").read_text())
        assert res["resumed_from"] == f"step_{n}" and res["start"] == n
        assert res["resumed_client"]["data"] == {"epoch": 0, "consumed_steps": n}
        assert res["resumed_client"]["config_hash"] == "abc" and res["resumed_client"]["world_size"] == 2
        assert res["first_loss"] == old["next_loss"]  # bitwise
        assert res["latest"] == f"step_{n + 2}"


@pytest.mark.distributed
def test_kill9_during_save_leaves_previous_checkpoint_resumable(tmp_path):
    out, run = tmp_path / "out", tmp_path / "run"
    (p,) = spawn_ranks(JOB, [str(run), str(out), "--hang-step", "4", "--max-steps", "6"], 1, tmp_path / "logs")
    deadline = time.time() + 180
    while not (out / "hanging_rank0").is_file():
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            pytest.fail("never reached the hanging save:\n" + _logs(tmp_path / "logs"))
        time.sleep(0.1)
    p.kill()  # SIGKILL in the middle of writing step_4
    p.wait(30)
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step_2"
    assert (root / "step_4").is_dir() and not (root / "step_4" / COMPLETE).exists()
    (p,) = spawn_ranks(JOB, [str(run), str(tmp_path / "out2"), "--max-steps", "6"], 1, tmp_path / "logs2")
    assert _wait([p], 180) == [0], _logs(tmp_path / "logs2")
    res = json.loads((tmp_path / "out2" / "result_rank0.json").read_text())
    assert res["resumed_from"] == "step_2" and res["start"] == 2 and res["saved"] == [4, 6]
    assert (root / "latest").read_text() == "step_6"
    assert (root / "step_4" / COMPLETE).is_file()  # re-saved whole
