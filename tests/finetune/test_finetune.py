"""``ptft finetune / evaluate / predict`` on a tiny BERT and a synthetic, separable sentiment task.

Runs that train go through the real entry point in a subprocess (one process, or 2 ranks over
gloo under torchrun / the deepspeed launcher); checks of exports, inference and bad input run in
this process. The tiny model (hidden 64, 2 layers, no dropout, initializer_range 0.1 so a random
encoder still carries token identity to [CLS]) learns the task in ~60 steps.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ptft_dist.config import FinetuneConfig, TokenizerConfig, load_config
from ptft_dist.errors import UserError
from tests.dist_scripts.common import cli_env

ROOT = Path(__file__).resolve().parents[2]
POS = ["good", "great", "excellent", "superb"]
NEG = ["bad", "awful", "terrible", "poor"]
FILL = ["the", "movie", "plot", "actor", "was", "really", "quite", "and", "story", "scene", "film", "music", "script", "cast", "long", "short", "with", "some", "very", "this", "that", "its", "a", "an", "of", "in", "on", "director", "camera", "ending", "start", "middle"]
N_TRAIN, N_VAL, N_TEST = 320, 64, 64  # N_TRAIN is a multiple of the global batch (16): no padded repeats


def sentence(rng: random.Random, label: str) -> str:
    words = [rng.choice(FILL) for _ in range(rng.randint(4, 10))]
    words.insert(rng.randint(0, len(words)), rng.choice(POS if label == "pos" else NEG))
    return " ".join(words)


def write_tsv(path: Path, n: int, seed: int, labels: tuple[str, ...] = ("pos", "neg"), header: str = "text\tlabel") -> Path:
    rng = random.Random(seed)
    rows = [header]
    for i in range(n):
        lab = labels[i % len(labels)]
        rows.append(f"{sentence(rng, 'pos' if lab == 'pos' else 'neg')}\t{lab}")
    path.write_text("\n".join(rows) + "\n")
    return path


def tiny_model(out: Path, tok_dir: Path, vocab_size: int, arch: str = "pretraining") -> Path:
    """A random tiny BERT saved like `ptft convert` (BertForPreTraining) or like MiniLM (BertModel)."""
    from transformers import BertConfig, BertForPreTraining, BertModel

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.1)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg) if arch == "pretraining" else BertModel(cfg)
    model.save_pretrained(str(out))
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from ptft_dist.corpus.tokenizer import train_wordpiece

    root = tmp_path_factory.mktemp("ft")
    write_tsv(root / "train.tsv", N_TRAIN, 1)
    write_tsv(root / "validation.tsv", N_VAL, 2)
    write_tsv(root / "test.tsv", N_TEST, 3)
    rng = random.Random(0)
    train_wordpiece([sentence(rng, lab) for lab in ["pos", "neg"] * 200], root / "tok",
                    TokenizerConfig(vocab_size=200, min_frequency=1))
    vocab = len(AutoTokenizer.from_pretrained(str(root / "tok")))
    tiny_model(root / "model", root / "tok", vocab)
    return root


def write_config(root: Path, name: str, **finetune) -> Path:
    ft = {"model": str(root / "model"), "train_file": str(root / "train.tsv"),
          "validation_file": str(root / "validation.tsv"), "test_file": str(root / "test.tsv"),
          "max_seq_len": 32, "epochs": 3, "lr": 2.0e-3, "batch_size": 16, "output_dir": str(root / name)}
    ft.update(finetune)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"finetune": ft, "train": {"backend": "deepspeed", "zero_stage": 2, "seed": 7,
                                                             "log_every": 5}}))
    return path


_env = cli_env



def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_finetune(config: Path, *overrides: str, nproc: int = 1, launcher: str = "torchrun") -> dict:
    """``ptft finetune`` in a subprocess; returns results.json."""
    module = ["-m", "ptft_dist.cli", "finetune", "--config", str(config), *overrides]
    if nproc == 1:
        cmd = [sys.executable, *module]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), *module]
    else:
        cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port",
               str(_port()), "--module", *module[1:]]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg = yaml.safe_load(config.read_text())["finetune"]
    out = Path(cfg["output_dir"])
    for o in overrides:
        if o.startswith("finetune.output_dir="):
            out = Path(o.split("=", 1)[1])
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def full_run(assets) -> dict:
    return run_finetune(write_config(assets, "full"))


@pytest.fixture(scope="module")
def lora_run(assets) -> dict:
    return run_finetune(write_config(assets, "lora", method="lora", lr=5.0e-3, export="both"))


# --------------------------------------------------------------------------- training


def test_full_finetune_learns_and_writes_a_complete_run(full_run, assets):
    r = full_run
    assert r["method"] == "full" and r["epochs_run"] == 3 and r["steps"] == 3 * N_TRAIN // 16
    assert r["validation"]["accuracy"] >= 0.9 and r["test"]["accuracy"] >= 0.9  # majority class: 0.5
    assert r["parameters"]["trainable"] == r["parameters"]["total"]
    assert r["task"]["label_names"] == ["neg", "pos"] and r["task"]["examples"]["train"] == N_TRAIN
    assert r["best_epoch"] == max(range(1, 4), key=lambda e: (r["history"][e - 1]["validation"]["accuracy"], -e))
    out = assets / "full"
    # train.zero_stage=2 at one rank runs as ZeRO-0 (nothing to partition; issue 13)
    assert r["zero_stage"] == 0 and json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0
    t = r["timings"]  # CPU seconds of training: this process's threads, at most all CPUs the whole time
    assert 0 < t["train_cpu_s"] <= t["train_s"] * (os.cpu_count() or 1) + 0.5
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "ptft_finetune.json"} <= \
        {p.name for p in (out / "best").iterdir()}
    assert (out / "resolved_config.yaml").is_file() and (out / "ds_config.json").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    splits = [x["split"] for x in recs]
    assert splits.count("validation") == 3 and splits.count("train_epoch") == 3 and splits.count("test") == 1
    assert all("loss" in x and "lr" in x for x in recs if x["split"] == "train")
    assert not list(out.glob(".best*"))  # no temporary export left behind


def test_lora_learns_and_merged_equals_adapter_plus_base(lora_run, assets):
    from ptft_dist.finetune.batches import collate, encode
    from ptft_dist.finetune.model import load_exported

    r = lora_run
    assert r["validation"]["accuracy"] >= 0.9 and r["test"]["accuracy"] >= 0.9
    assert r["parameters"]["trainable"] < r["parameters"]["total"] / 2
    best = assets / "lora" / "best"
    merged, adapter = load_exported(best), load_exported(best / "adapter")
    assert merged.kind == "merged" and adapter.kind == "adapter"
    assert "peft" not in type(merged.model).__module__  # plain transformers class
    acfg = json.loads((best / "adapter" / "adapter_config.json").read_text())
    assert set(acfg["modules_to_save"]) >= {"classifier", "pooler"}
    assert not any("pooler" in t for t in acfg["target_modules"])
    rng = random.Random(5)
    texts = [sentence(rng, lab) for lab in ["pos", "neg"] * 16]
    batch = collate(encode(merged.tokenizer, texts, None, 32), range(len(texts)), merged.tokenizer.pad_token_id)
    with torch.no_grad():
        a, b = merged.model(**batch).logits, adapter.model(**batch).logits
    assert float((a - b).abs().max()) <= 1e-5


@pytest.mark.distributed
def test_two_rank_zero2_matches_single_process(full_run, assets):
    """Same seed, same global batch (2 ranks x 8 = 1 x 16): the same examples in every step (and the
    same updates from the single process's ZeRO-0 as from ZeRO-2)."""
    r2 = run_finetune(write_config(assets, "full2"), "finetune.batch_size=8", nproc=2)
    assert r2["world_size"] == 2 and r2["zero_stage"] == 2 and r2["steps"] == full_run["steps"]
    for split in ("validation", "test"):
        assert abs(r2[split]["accuracy"] - full_run[split]["accuracy"]) <= 1 / 64 + 1e-9
        assert r2[split]["loss"] == pytest.approx(full_run[split]["loss"], rel=1e-4, abs=1e-5)
    for h1, h2 in zip(full_run["history"], r2["history"]):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-4, abs=1e-5)


@pytest.mark.distributed
def test_zero3_two_rank_lora_adapter_saved_and_reloadable(assets):
    from safetensors.torch import load_file

    from ptft_dist.finetune.evaluate import evaluate_model

    cfg_path = write_config(assets, "lora3", method="lora", lr=5.0e-3, export="adapter", epochs=1, batch_size=8)
    r = run_finetune(cfg_path, "train.zero_stage=3", nproc=2, launcher="deepspeed")
    assert r["zero_stage"] == 3 and r["world_size"] == 2
    best = assets / "lora3" / "best"
    assert (best / "adapter_config.json").is_file() and not (best / "config.json").exists()
    weights = load_file(str(best / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in lora_b) and any(float(v.abs().max()) > 0 for v in lora_b)
    assert any("classifier" in k for k in weights) and any("pooler" in k for k in weights)
    # the reloaded adapter reproduces the engine's validation numbers of the best epoch
    cfg = load_config(cfg_path).finetune
    m = evaluate_model(best, cfg, "validation", device=torch.device("cpu"))
    assert m["kind"] == "adapter" and m["accuracy"] == r["validation"]["accuracy"]
    assert m["loss"] == pytest.approx(r["validation"]["loss"], abs=1e-5)


# --------------------------------------------------------------------------- evaluate / predict


def test_evaluate_and_predict_on_an_export(full_run, assets, monkeypatch, capsys):
    from ptft_dist import cli as cli_commands
    from ptft_dist.finetune.evaluate import evaluate_model, predict

    best = assets / "full" / "best"
    cfg = load_config(assets / "full.yaml").finetune
    m = evaluate_model(best, cfg, "test", device=torch.device("cpu"))
    assert m["accuracy"] == full_run["test"]["accuracy"]
    assert m["loss"] == pytest.approx(full_run["test"]["loss"], abs=1e-5)

    texts = ["the movie was really great", "an awful script and a bad cast", ("the plot", "quite superb")]
    rows = list(predict(best, texts, batch_size=2, device=torch.device("cpu")))
    assert len(rows) == 3
    for row in rows:
        assert row["label"] in ("neg", "pos") and set(row["probabilities"]) == {"neg", "pos"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    assert [rows[0]["label"], rows[1]["label"]] == ["pos", "neg"]

    monkeypatch.setattr(sys, "stdin", io.StringIO("a great film\nthe cast\tterrible ending\n\n"))
    assert cli_commands.main(["predict", "--model", str(best)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and lines[0]["label"] == "pos" and lines[1]["label"] == "neg"

    assert cli_commands.main(["evaluate", "--model", str(best), "--config", str(assets / "full.yaml"),
                              "--split", "validation"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == full_run["validation"]["accuracy"]


def test_pairs_are_encoded_as_two_segments(assets):
    from transformers import AutoTokenizer

    from ptft_dist.finetune.batches import collate, encode

    tok = AutoTokenizer.from_pretrained(str(assets / "model"))
    enc = encode(tok, ["the movie", "a"], ["was great", "b c"], 8)
    batch = collate(enc, [0, 1], tok.pad_token_id, labels=np.array([1, 0]))
    assert batch["token_type_ids"][0].tolist().count(1) == len(tok("was great")["input_ids"]) - 1
    assert batch["input_ids"][0, 0] == tok.cls_token_id and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [len(x) for x in enc.input_ids]


def test_bertmodel_dir_loads_with_its_encoder_weights(assets, tmp_path):
    """A MiniLM-style export (BertModel, no 'bert.' prefix) keeps every encoder weight."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ptft_dist.finetune.model import build_model

    d = tiny_model(tmp_path / "bm", assets / "tok", len(AutoTokenizer.from_pretrained(str(assets / "tok"))), "model")
    saved = load_file(str(d / "model.safetensors"))
    model = build_model(d, ["neg", "pos"], FinetuneConfig(method="lora"), seed=0)
    params = dict(model.named_parameters())
    # the word embeddings carry a LoRA adapter by default: their frozen base weight sits under base_layer
    emb = params["base_model.model.bert.embeddings.word_embeddings.base_layer.weight"]
    assert torch.equal(emb, saved["embeddings.word_embeddings.weight"])
    assert params["base_model.model.bert.embeddings.word_embeddings.lora_embedding_A.default"].requires_grad
    pooler = params["base_model.model.bert.pooler.modules_to_save.default.dense.weight"]
    assert pooler.requires_grad and torch.equal(pooler, saved["pooler.dense.weight"])
    assert not emb.requires_grad


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["text_column", "label_column", "unseen_label", "tokenizer_too_big", "no_model",
                                  "export_adapter_full", "metric"])
def test_bad_input_fails_early_with_one_line(case, assets, tmp_path, capsys):
    from transformers import AutoTokenizer

    from ptft_dist.cli import main

    over: dict = {}
    expect = ""
    if case == "text_column":
        over, expect = {"text_column": "sentence"}, "no column 'sentence'"
    elif case == "label_column":
        write_tsv(tmp_path / "t.tsv", 20, 1, header="text\tstars")
        over, expect = {"train_file": str(tmp_path / "t.tsv")}, "no column 'label'"
    elif case == "unseen_label":
        write_tsv(tmp_path / "v.tsv", 9, 2, labels=("pos", "neg", "meh"))
        over, expect = {"validation_file": str(tmp_path / "v.tsv")}, "never appear in the train split"
    elif case == "tokenizer_too_big":
        vocab = len(AutoTokenizer.from_pretrained(str(assets / "tok")))
        over = {"model": str(tiny_model(tmp_path / "small", assets / "tok", vocab - 20))}
        expect = f"the tokenizer has {vocab} tokens but the model's vocab_size is {vocab - 20}"
    elif case == "no_model":
        over, expect = {"model": str(tmp_path / "nope")}, "no such model directory"
    elif case == "export_adapter_full":
        over, expect = {"export": "adapter"}, "needs finetune.method=lora"
    elif case == "metric":
        over, expect = {"metric_for_best": "pearson"}, "not a classification metric"
    cfg = write_config(assets, f"bad-{case}", output_dir=str(tmp_path / "out"), **over)
    capsys.readouterr()
    assert main(["finetune", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptft: error:") and expect in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written, not even a half-made output dir


def test_a_pretraining_key_is_refused_not_silently_replaced(assets, tmp_path, capsys):
    from ptft_dist.cli import main

    cfg = write_config(assets, "bad-optim-lr", output_dir=str(tmp_path / "out"))
    capsys.readouterr()
    assert main(["finetune", "--config", str(cfg), "optim.lr=1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ptft: error: optim.lr is not used by ptft finetune; set finetune.lr (finetune.lora_lr for LoRA)"]
    assert not (tmp_path / "out").exists()


def test_user_errors_are_user_errors(assets, tmp_path):
    from ptft_dist.finetune.evaluate import evaluate_model
    from ptft_dist.finetune.model import load_exported

    with pytest.raises(UserError, match="no such model directory"):
        load_exported(tmp_path / "missing")
    cfg = FinetuneConfig(train_file=str(assets / "train.tsv"))
    with pytest.raises(UserError, match="--split"):
        evaluate_model(assets / "model", cfg, "dev")


def test_tokenizer_without_bert_post_processor_is_refused(assets, tmp_path):
    from tokenizers import Tokenizer

    from ptft_dist.finetune.model import load_config as load_model_config
    from ptft_dist.finetune.model import load_tokenizer

    d = tmp_path / "m"
    shutil.copytree(assets / "model", d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.post_processor = None
    tok.save(str(d / "tokenizer.json"))
    tcfg = json.loads((d / "tokenizer_config.json").read_text())  # a generic class: BertTokenizer would re-add it
    (d / "tokenizer_config.json").write_text(json.dumps({**tcfg, "tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(UserError, match=r"does not add \[CLS\]"):
        load_tokenizer(d, load_model_config(d))


def test_failed_export_leaves_the_previous_one_untouched(lora_run, assets, tmp_path, monkeypatch):
    from ptft_dist.finetune import model as fm

    out = tmp_path / "best"
    shutil.copytree(assets / "lora" / "best", out)
    before = sorted(p.name for p in out.rglob("*"))
    cfg = FinetuneConfig(model=str(assets / "model"), method="lora", export="both")
    built = fm.build_model(assets / "model", ["neg", "pos"], cfg, seed=7)
    trained = {n: p.detach().clone() for n, p in built.named_parameters() if p.requires_grad}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fm, "copy_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        fm.export_model(assets / "model", ["neg", "pos"], cfg, trained, out, seed=7)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".best")]
    monkeypatch.undo()
    fm.export_model(assets / "model", ["neg", "pos"], cfg, trained, tmp_path / "fresh", seed=7)
    assert (tmp_path / "fresh" / "adapter" / "adapter_config.json").is_file()
