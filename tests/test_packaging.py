"""A non-editable install works away from the checkout.

The repository (tracked and untracked-but-not-ignored files, as a clone would have them) is copied,
built into a wheel (``pip wheel --no-deps --no-build-isolation``: nothing downloaded), and that
wheel is pip-installed into a fresh virtual environment whose only other entry is the project
venv's site-packages (a ``.pth`` line: its dependencies, but not its editable ``ptft_dist``
finder, whose ``.pth`` is never processed from there). ``python -m ptft_dist.cli pretrain`` then
runs 2 steps from an unrelated working directory: it must find the DeepSpeed templates as
package data.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ptft_dist.engine.ds_config import zero3_live_parameters
from tests.corpus_factory import make_corpus

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def checkout_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode().split("\0")
    return sorted({f for f in out if f and os.path.lexists(ROOT / f)})


def copy_checkout(dest: Path) -> None:
    for rel in checkout_files():
        src, dst = ROOT / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif src.is_file():
            shutil.copy2(src, dst)


def package_data_needed() -> set[str]:
    """Every non-Python file under ptft_dist/ in the checkout: the code reads them at run time
    (today: the DeepSpeed templates under ptft_dist/engine/ds_configs/, read via Path(__file__))."""
    return {f for f in checkout_files() if f.startswith("ptft_dist/") and not f.endswith(".py")
            and not (ROOT / f).is_symlink()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("install")
    copy_checkout(tmp / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "wheel"),
                    str(tmp / "src")], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp / "wheel").glob("ptft_dist-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=120)
    py = tmp / "venv" / "bin" / "python"
    target = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (target / "project_venv_deps.pth").write_text("\n".join(deps) + "\n")
    return {"wheel": wheel, "python": py, "site": target, "tmp": tmp}


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    for k in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_wheel_holds_every_file_the_code_reads(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    data = package_data_needed()
    assert {f"ptft_dist/engine/ds_configs/zero{s}.json" for s in range(4)} <= data  # the list is not empty
    assert not data - names, f"missing from the wheel: {sorted(data - names)}"
    sources = {f for f in checkout_files() if f.startswith("ptft_dist/") and f.endswith(".py")}
    assert not sources - names, f"modules missing from the wheel: {sorted(sources - names)}"


def test_installed_package_pretrains_from_another_directory(installed, tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus, shard_docs=(12, 12), val_docs=(4,), sentences=(2, 6))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    py, site_dir = str(installed["python"]), installed["site"]
    probe = subprocess.run([py, "-c", "import json, ptft_dist.engine.ds_config as m; "
                                      "print(json.dumps([m.__file__, str(m.DS_CONFIG_DIR)]))"],
                           cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    module_file, template_dir = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(module_file).is_relative_to(site_dir) and Path(template_dir).is_relative_to(site_dir)
    assert not Path(module_file).is_relative_to(ROOT)

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [py, "-m", "ptft_dist.cli", "pretrain", "--corpus", str(corpus), "--run-dir", str(run_dir),
         "train.zero_stage=3", "model.hidden_size=32", "model.num_attention_heads=2", "model.num_hidden_layers=2",
         "model.intermediate_size=64", "data.max_seq_len=64", "data.num_workers=0", "train.micro_batch_size=4",
         "train.max_steps=2", "optim.warmup_steps=1", "train.log_every=1", "train.eval_batches=1"],
        cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["split"] == "train"] == [1, 2]
    ds = json.loads((run_dir / "ds_config.json").read_text())
    shipped = json.loads((Path(template_dir) / "zero3.json").read_text())["zero_optimization"]
    assert ds["zero_optimization"]["stage"] == 3
    # the installed template's "auto" was filled from this run's model (hidden 32), not a repository copy
    assert shipped["stage3_max_live_parameters"] == "auto"
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == zero3_live_parameters(32)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is shipped[
        "stage3_gather_16bit_weights_on_model_save"]

    demo = subprocess.run([py, "-m", "ptft_dist.cli", "demo", "--quick", "-o", str(tmp_path / "demo")],
                          cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=300)
    assert demo.returncode == 2 and "ptft: error: ptft demo runs from a clone of the repository" in demo.stderr
    assert not (tmp_path / "demo").exists()  # stopped before any stage
