"""Every shipped config starts: each ``configs/**/*.yaml`` and each ``ds_configs/*.json`` goes through
the real ``ptft pretrain`` / ``ptft finetune`` command line for 2 optimizer steps on CPU.

The command lines run through ``ptft_dist.cli.main`` in one helper process (tests/cli_batch.py:
one import of torch/DeepSpeed for all of them, each run with its own log), one rank each: every
ZeRO stage, offload included, runs with one rank too.

What a CPU run overrides, and why (nothing else of the preset is touched; the test checks that the
resolved config keeps every other value of the file):
- model shape (hidden 32, 2 layers, 2 heads, FFN 64) and data.max_seq_len=64: the presets' BERT
  sizes take minutes a step on 2 cores;
- train.micro_batch_size=4 (grad_accum stays as shipped), train.max_steps=2, optim.warmup_steps=1
  (a warmup longer than the run is refused), train.eval_batches=2, train.log_every=1 (both steps
  in metrics.jsonl);
- data.num_workers=0: worker processes cost a process start each on 2 cores (tested elsewhere);
- train.precision=fp32 where a preset asks for bf16/fp16: CPU runs are fp32 (bf16 on this CPU is
  ~100x slower); the preset's own precision is checked by resolving its DeepSpeed config for a CUDA
  device (below);
- offload pin_memory needs nothing: its "auto" resolves to false off CUDA.
A preset that needs CUDA by design (optim.name=lamb: DeepSpeed's FusedLamb is a CUDA op) must fail
on CPU with that message, exit 2, and nothing written; it then runs once more with optim.name=adamw
(the only CUDA-only part replaced) so that the rest of it is walked too.

Every pretraining preset also goes through the full DeepSpeed config resolution for a CUDA device:
``torch.device("cuda")`` and ``torch.cuda.is_bf16_supported`` are stand-ins there (no GPU here),
named as such.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ptft_dist.config import TokenizerConfig, load_config
from ptft_dist.engine.ds_config import resolve_deepspeed_config
from tests.corpus_factory import make_corpus

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_PRESETS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
FINETUNE_PRESETS = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
CPU_SIZE = {
    "model.hidden_size": "32", "model.num_attention_heads": "2", "model.num_hidden_layers": "2",
    "model.intermediate_size": "64", "data.max_seq_len": "64", "data.num_workers": "0",
    "train.micro_batch_size": "4", "train.max_steps": "2", "optim.warmup_steps": "1",
    "train.eval_batches": "2", "train.log_every": "1",
}
CUDA_MESSAGE = "optim.name=lamb needs DeepSpeed's FusedLamb, a CUDA op"

pytestmark = pytest.mark.slow


def flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def needs_cuda(preset: Path) -> bool:
    return flat(yaml.safe_load(preset.read_text())).get("optim.name") == "lamb"


def cpu_overrides(preset: Path) -> dict[str, str]:
    """CPU_SIZE plus fp32 where the preset asks for a GPU precision."""
    out = dict(CPU_SIZE)
    if flat(yaml.safe_load(preset.read_text())).get("train.precision") in ("bf16", "fp16"):
        out["train.precision"] = "fp32"
    return out


def argv_overrides(d: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def ds_flags(template: Path) -> dict[str, str]:
    """The run-config keys a user sets with this JSON: its stage, and the offload it was made for."""
    zero = json.loads(template.read_text()).get("zero_optimization", {})
    flags = {"train.zero_stage": str(zero.get("stage", 0))}
    if "offload_optimizer" in zero:
        flags["train.offload_optimizer"] = "true"
    if "offload_param" in zero:
        flags["train.offload_params"] = "true"
    return flags


# --------------------------------------------------------------------------- the runs


def _finetune_assets(root: Path) -> dict[str, str]:
    """A tiny BERT (tokenizer included) and train/validation/test TSVs: 64 train rows = 2 steps of 32."""
    from transformers import AutoTokenizer

    from ptft_dist.corpus.tokenizer import train_wordpiece
    from tests.finetune.test_finetune import sentence, tiny_model, write_tsv

    root.mkdir(parents=True)
    files = {f"finetune.{split}_file": str(write_tsv(root / f"{split}.tsv", n, seed))
             for split, n, seed in (("train", 64, 1), ("validation", 32, 2), ("test", 32, 3))}
    rng = random.Random(0)
    train_wordpiece([sentence(rng, lab) for lab in ["pos", "neg"] * 100], root / "tok",
                    TokenizerConfig(vocab_size=200, min_frequency=1))
    tiny_model(root / "model", root / "tok", len(AutoTokenizer.from_pretrained(str(root / "tok"))), arch="model")
    return {"finetune.model": str(root / "model"), **files}


def planned_runs(tmp: Path) -> tuple[dict[str, list[str]], dict[str, dict]]:
    corpus = tmp / "corpus"
    make_corpus(corpus, shard_docs=(20, 20), val_docs=(6,), sentences=(2, 8), n_words=(4, 12))
    runs: dict[str, list[str]] = {}
    info: dict[str, dict] = {}

    def pretrain(name: str, config: list[str], overrides: dict[str, str]) -> None:
        run_dir = tmp / name
        runs[name] = ["pretrain", *config, "--corpus", str(corpus), "--run-dir", str(run_dir), *argv_overrides(overrides)]
        info[name] = {"run_dir": run_dir, "overrides": overrides}

    for preset in PRETRAIN_PRESETS:
        rel = str(preset.relative_to(ROOT))
        pretrain(f"pretrain-{preset.stem}", ["-c", rel], cpu_overrides(preset))
        if needs_cuda(preset):
            pretrain(f"pretrain-{preset.stem}-adamw", ["-c", rel], {**cpu_overrides(preset), "optim.name": "adamw"})
    for template in DS_CONFIGS:
        rel = str(template.relative_to(ROOT))
        pretrain(f"ds-{template.stem}", [], {**CPU_SIZE, "train.deepspeed_config": rel, **ds_flags(template)})
    assets = _finetune_assets(tmp / "ft_assets")
    for preset in FINETUNE_PRESETS:
        for method in ("full", "lora"):  # the preset's own method, and the documented --method lora
            name = f"finetune-{preset.stem}-{method}"
            out = tmp / name
            overrides = {**assets, "finetune.output_dir": str(out)}
            runs[name] = ["finetune", "-c", str(preset.relative_to(ROOT)), "--method", method,
                          *argv_overrides(overrides)]
            info[name] = {"output_dir": out, "overrides": {**overrides, "finetune.method": method}}
    return runs, info


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> tuple[dict, dict, Path]:
    """Every run, once: results (exit status, seconds), plan info, and the folder with the logs."""
    tmp = tmp_path_factory.mktemp("shipped")
    runs, info = planned_runs(tmp)
    (tmp / "runs.json").write_text(json.dumps(runs))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # cwd = the checkout: the paths are typed as a user in a clone types them (configs/..., ds_configs/...)
    proc = subprocess.run([sys.executable, "-m", "tests.cli_batch", str(tmp / "runs.json"), str(tmp / "results.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    assert set(results) == set(runs), proc.stderr[-3000:]
    return results, info, tmp


def log_of(cli, name: str) -> str:
    return (cli[2] / f"{name}.log").read_text(errors="replace")


def train_losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def assert_trained_two_steps(cli, name: str) -> dict:
    """Exit 0, steps 1 and 2 logged with finite losses, a verified checkpoint at step 2; the run's
    resolved config and DeepSpeed config (returned)."""
    from ptft_dist.checkpoint.manager import find_checkpoint

    results, info, _ = cli
    assert results[name]["rc"] == 0, log_of(cli, name)[-3000:]
    run_dir = info[name]["run_dir"]
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) and v > 0 for v in losses.values()), losses
    assert find_checkpoint(run_dir).name == "step_2"
    resolved = flat(yaml.safe_load((run_dir / "resolved_config.yaml").read_text()))
    for key, value in info[name]["overrides"].items():
        assert resolved[key] == yaml.safe_load(value), key
    return json.loads((run_dir / "ds_config.json").read_text())


def assert_keeps_preset(preset: Path, resolved_file: Path, overridden: dict[str, str]) -> None:
    """Every value the preset file sets, and the CPU run did not override, is what the run used."""
    resolved = flat(yaml.safe_load(resolved_file.read_text()))
    for key, value in flat(yaml.safe_load(preset.read_text())).items():
        if key not in overridden:
            assert resolved[key] == value, f"{preset.name}: {key} = {value!r} in the file, {resolved[key]!r} in the run"


# --------------------------------------------------------------------------- pretraining presets


@pytest.mark.parametrize("preset", PRETRAIN_PRESETS, ids=lambda p: p.stem)
def test_pretrain_preset_runs_on_cpu(cli, preset):
    name = f"pretrain-{preset.stem}"
    results, info, _ = cli
    if needs_cuda(preset):
        log = log_of(cli, name)
        errors = [line for line in log.splitlines() if line.startswith("ptft: error:")]
        assert results[name]["rc"] == 2 and len(errors) == 1 and CUDA_MESSAGE in errors[0], log[-3000:]
        assert not list((info[name]["run_dir"] / "checkpoints").glob("step_*"))  # nothing half-written
        name = f"{name}-adamw"
    ds = assert_trained_two_steps(cli, name)
    assert_keeps_preset(preset, info[name]["run_dir"] / "resolved_config.yaml", info[name]["overrides"])
    shipped = flat(yaml.safe_load(preset.read_text()))
    assert ds["zero_optimization"]["stage"] == shipped.get("train.zero_stage", 2)
    assert ds["train_batch_size"] == 4 * shipped.get("train.grad_accum", 1)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize("preset", PRETRAIN_PRESETS, ids=lambda p: p.stem)
def test_pretrain_preset_resolves_for_cuda(preset, monkeypatch):
    """The preset as shipped (no override) passes the whole DeepSpeed config resolution on 8 GPUs.
    Stand-ins: ``torch.device("cuda")`` (only its type is read) and ``torch.cuda.is_bf16_supported``."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = load_config(preset)
    ds = resolve_deepspeed_config(cfg.train, cfg.optim, 8, torch.device("cuda"))
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 8
    assert ds["bf16"]["enabled"] is (cfg.train.precision in ("bf16", "auto"))
    assert ds["optimizer"]["type"] == {"adamw": "AdamW", "lamb": "Lamb"}[cfg.optim.name]
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(cfg.optim.lr)
    if cfg.optim.name == "lamb":  # LAMB's per-layer trust ratio: whole layers, no ZeRO partitions
        assert cfg.train.zero_stage == 0
    assert "auto" not in json.dumps(ds)


# --------------------------------------------------------------------------- DeepSpeed JSON templates


@pytest.mark.parametrize("template", DS_CONFIGS, ids=lambda p: p.stem)
def test_ds_config_runs_through_the_cli(cli, template):
    ds = assert_trained_two_steps(cli, f"ds-{template.stem}")
    shipped = json.loads(template.read_text())["zero_optimization"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == shipped["stage"]
    for section in ("offload_optimizer", "offload_param"):
        if section in shipped:
            assert zero[section] == {"device": "cpu", "pin_memory": False}, zero  # pin_memory: "auto" = CUDA only
    for key, value in shipped.items():  # the template's own tuning values reach DeepSpeed unchanged
        if value != "auto" and not isinstance(value, dict):
            assert zero[key] == value, key


def test_every_ds_config_trains_the_same_model(cli):
    """Same seed, data and model under ZeRO 0-3 with and without offload: the same losses (ZeRO
    changes where state lives, not the arithmetic; CPU Adam's fused update rounds differently)."""
    results, info, _ = cli
    names = [f"ds-{t.stem}" for t in DS_CONFIGS]
    assert all(results[n]["rc"] == 0 for n in names), {n: results[n] for n in names}
    losses = {n: train_losses(info[n]["run_dir"]) for n in names}
    first = losses[names[0]]
    assert first[2] != first[1]
    for n in names[1:]:
        assert losses[n][1] == pytest.approx(first[1], rel=1e-6), (n, losses[n], first)
        assert losses[n][2] == pytest.approx(first[2], rel=1e-4), (n, losses[n], first)


# --------------------------------------------------------------------------- fine-tuning presets


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("preset", FINETUNE_PRESETS, ids=lambda p: p.stem)
def test_finetune_preset_runs_on_cpu(cli, preset, method):
    results, info, _ = cli
    name = f"finetune-{preset.stem}-{method}"
    assert results[name]["rc"] == 0, log_of(cli, name)[-3000:]
    out = info[name]["output_dir"]
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and res["steps"] == 2, res
    assert 0.0 <= res["test"]["accuracy"] <= 1.0 and (out / "best").is_dir()
    assert_keeps_preset(preset, out / "resolved_config.yaml", info[name]["overrides"])
