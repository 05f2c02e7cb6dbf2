"""Config values and keys a command cannot use are refused at load, naming the key (docs/refusals.md).

Every check runs through the real CLI where a command is involved; the config error comes before
any import of torch, any corpus read and any output directory (the run dir must not appear).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml

from ptft_dist.config import Config, ConfigError, load_config
from ptft_dist.config_rules import RANGES, SCOPES, Range
from tests.bad_inputs.refusal import refused

ROOT = Path(__file__).resolve().parents[2]


def _pretrain(tmp_path: Path, *overrides: str) -> list[str]:
    return ["pretrain", "-c", ROOT / "configs/pretrain/tiny-cpu.yaml", "--corpus", tmp_path / "corpus",
            "--run-dir", tmp_path / "run", *overrides]


# --------------------------------------------------------------------------- the named cases


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0, got -1.0"),
    ("optim.lr=0", "optim.lr must be a finite number > 0, got 0.0"),
    ("optim.lr=.inf", "optim.lr must be a finite number > 0, got inf"),
    ("checkpoint.every=-1", "checkpoint.every must be an integer >= 0, got -1"),
    ("data.mlm_probability=1.5", "data.mlm_probability must be a finite number in (0, 1], got 1.5"),
    ("train.zero_stage=4", "train.zero_stage must be one of 0, 1, 2, 3, got 4"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be numbers in [0, 1), got [0.9, 1.5]"),
])
def test_pretrain_refuses_an_out_of_range_value_at_load(tmp_path, capsys, override, needle):
    assert refused(capsys, *_pretrain(tmp_path, override)) == f"ptft: error: {needle}"
    assert not (tmp_path / "run").exists()


def test_pretrain_refuses_max_seq_len_above_max_position_embeddings(tmp_path, capsys):
    err = refused(capsys, *_pretrain(tmp_path, "data.max_seq_len=1024"))
    assert "data.max_seq_len (1024) is larger than model.max_position_embeddings (512)" in err
    err = refused(capsys, *_pretrain(tmp_path, "data.max_seq_len=256", "model.max_position_embeddings=128"))
    assert "data.max_seq_len (256) is larger than model.max_position_embeddings (128)" in err
    assert not (tmp_path / "run").exists()


def test_pretrain_refuses_replacement_probabilities_above_one(tmp_path, capsys):
    err = refused(capsys, *_pretrain(tmp_path, "data.mask_replace_prob=0.8", "data.random_replace_prob=0.3"))
    assert "data.mask_replace_prob (0.8) + data.random_replace_prob (0.3) = 1.1 must be <= 1" in err


def test_pretrain_refuses_nsp_without_room_for_two_segments(tmp_path, capsys):
    err = refused(capsys, *_pretrain(tmp_path, "data.max_seq_len=4"))
    assert "data.max_seq_len (4) must be >= 5 with data.nsp=true" in err
    assert load_config(None, ["data.max_seq_len=4", "data.nsp=false"]).data.max_seq_len == 4


def test_pretrain_refuses_packed_rows_with_nsp_or_without_packed_attention(tmp_path, capsys):
    err = refused(capsys, *_pretrain(tmp_path, "data.pack_samples=true"))
    assert "data.pack_samples=true needs data.nsp=false" in err
    err = refused(capsys, *_pretrain(tmp_path, "data.pack_samples=true", "data.nsp=false", "model.unpad=false"))
    assert "data.pack_samples=true needs model.unpad=true" in err
    err = refused(capsys, *_pretrain(tmp_path, "data.pack_samples=true", "data.nsp=false", "model.attn_implementation=eager"))
    assert "data.pack_samples=true: model.attn_implementation=eager has no variable-length" in err
    assert not (tmp_path / "run").exists()
    assert load_config(None, ["data.pack_samples=true", "data.nsp=false"]).data.pack_samples


def test_prepare_refuses_min_chars_above_max_chars(tmp_path, capsys):
    err = refused(capsys, "prepare", "-i", tmp_path / "x.jsonl", "-o", tmp_path / "o",
                  "prepare.clean.min_chars=100", "prepare.clean.max_chars=10")
    assert "prepare.clean.min_chars (100) is larger than prepare.clean.max_chars (10)" in err
    assert not (tmp_path / "o").exists()


def test_a_range_error_in_a_yaml_file_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"optim": {"lr": -0.001}, "train": {"max_steps": 10}}))
    err = refused(capsys, "pretrain", "-c", cfg, "--corpus", tmp_path / "c", "--run-dir", tmp_path / "run")
    assert err == "ptft: error: optim.lr must be a finite number > 0, got -0.001"


# --------------------------------------------------------------------------- every numeric field


def _numeric(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return len(args) == 1 and _numeric(args[0])
    if typing.get_origin(tp) is list:
        return _numeric(args[0])
    return tp in (int, float)


def _numeric_keys(cls=Config, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += _numeric_keys(tp, f"{prefix}{f.name}.")
        elif _numeric(tp):
            out.append(prefix + f.name)
    return out


def test_every_numeric_field_has_a_range():
    keys = _numeric_keys()
    assert len(keys) > 60
    missing = [k for k in keys if k not in RANGES]
    assert not missing, f"add these to ptft_dist/config_rules.py RANGES: {missing}"
    assert not [k for k in RANGES if k not in keys], "RANGES names a key that is not a numeric field"


def _outside(rng: Range, integer: bool) -> list:
    """Values just outside the range (and NaN / inf for floats)."""
    if rng.choices:
        return [max(rng.choices) + 1, min(rng.choices) - 1]
    out = []
    if rng.lo is not None:
        out.append(rng.lo if rng.lo_open else rng.lo - (1 if integer else 1e-3))
    if rng.hi is not None:
        out.append(rng.hi if rng.hi_open else rng.hi + (1 if integer else 1e-3))
    if not integer:
        out += [math.nan, math.inf]
    return [int(v) if integer else v for v in out]


def _is_int(key: str) -> bool:
    cls = Config
    *sections, name = key.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    tp = typing.get_type_hints(cls)[name]
    while typing.get_args(tp):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp is int


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_numeric_field_refuses_values_outside_its_range(key):
    is_list = isinstance(getattr(getattr(Config(), key.split(".")[0]), key.split(".")[-1], None), list)
    for bad in _outside(RANGES[key], _is_int(key)):
        value = f"[{bad}, {bad}]" if is_list else str(bad)
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={value}"])
        assert str(err.value).startswith(f"{key} must be"), (key, value, str(err.value))


def test_defaults_shipped_presets_and_range_edges_load():
    load_config(None)
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        load_config(path)
    edges = ["optim.lr=1e-12", "prepare.validation_fraction=0", "data.mlm_probability=1", "checkpoint.every=0",
             "model.hidden_dropout_prob=0", "train.zero_stage=0", "checkpoint.requeue_exit_code=255"]
    load_config(None, edges)


def test_configuration_docs_show_the_ranges():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert "| `optim.lr` | float | `0.0001` | > 0 |" in doc
    assert "| `data.mlm_probability` | float | `0.15` | (0, 1] |" in doc
    assert "| `train.zero_stage` | int | `2` | one of 0, 1, 2, 3 |" in doc


# --------------------------------------------------------------------------- keys a command does not read


def test_pretrain_refuses_a_prepare_key(tmp_path, capsys):
    err = refused(capsys, *_pretrain(tmp_path, "prepare.tokenizer.vocab_size=8000"))
    assert err == ("ptft: error: prepare.tokenizer.vocab_size is not used by ptft pretrain "
                   "(the prepare section is read by ptft prepare); remove it")
    assert not (tmp_path / "run").exists()


def test_pretrain_refuses_finetune_keys_from_a_yaml_file(tmp_path, capsys):
    cfg = tmp_path / "mixed.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"max_steps": 10}, "finetune": {"epochs": 5, "lr": 3e-5}}))
    err = refused(capsys, "pretrain", "-c", cfg, "--corpus", tmp_path / "c", "--run-dir", tmp_path / "run")
    assert "finetune.epochs, finetune.lr are not used by ptft pretrain" in err


def test_prepare_refuses_pretraining_keys(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
    err = refused(capsys, "prepare", "-i", tmp_path / "x.jsonl", "-o", tmp_path / "o", "data.max_seq_len=256",
                  "model.preset=base")
    assert "data.max_seq_len is not used by ptft prepare" in err and "model.preset is not used by ptft prepare" in err
    assert not (tmp_path / "o").exists()


def test_prepare_refuses_an_override_even_when_it_equals_the_default(tmp_path, capsys):
    err = refused(capsys, "prepare", "-i", tmp_path / "x.jsonl", "-o", tmp_path / "o", "optim.lr=1e-4")
    assert "optim.lr is not used by ptft prepare" in err


def test_finetune_refuses_pretraining_sections_and_keeps_its_messages(tmp_path, capsys):
    err = refused(capsys, "finetune", "finetune.model=m", f"finetune.output_dir={tmp_path / 'out'}",
                  "model.preset=base")
    assert "model.preset is not used by ptft finetune (the model section is read by ptft pretrain)" in err
    err = refused(capsys, "finetune", "finetune.model=m", f"finetune.output_dir={tmp_path / 'out'}",
                  "optim.lr=1e-3")
    assert err == "ptft: error: optim.lr is not used by ptft finetune; set finetune.lr (finetune.lora_lr for LoRA)"
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_pretraining_key_on_its_command_line(tmp_path, capsys):
    cfg = ROOT / "configs/finetune/rotten_tomatoes.yaml"
    err = refused(capsys, "evaluate", "--model", tmp_path / "m", "--config", cfg, "data.max_seq_len=64")
    assert "data.max_seq_len is not used by ptft evaluate" in err
    err = refused(capsys, "evaluate", "--model", tmp_path / "m", "--config", cfg, "train.zero_stage=3")
    assert "train.zero_stage is not used by ptft evaluate" in err


def test_inspect_refuses_a_model_override_but_takes_a_pretraining_config(tmp_path, capsys):
    from tests.corpus_factory import make_corpus

    corpus = make_corpus(tmp_path / "c").root
    err = refused(capsys, "inspect", corpus, "--samples", "1", "model.preset=base")
    assert "model.preset is not used by ptft inspect (the model section is read by ptft pretrain)" in err
    err = refused(capsys, "inspect", corpus, "--samples", "1", "prepare.workers=4")
    assert "prepare.workers is not used by ptft inspect" in err
    capsys.readouterr()
    from ptft_dist.cli import main

    assert main(["inspect", str(corpus), "--samples", "1", "-c", str(ROOT / "configs/pretrain/tiny-cpu.yaml"),
                 "data.max_seq_len=64"]) == 0
    assert "sample" in capsys.readouterr().out


def test_every_command_that_takes_a_config_declares_its_sections():
    from ptft_dist.cli import COMMANDS, build_parser

    parser = build_parser()
    with_config = set()
    for name, *_ in COMMANDS:
        sub = parser._subparsers._group_actions[0].choices[name]
        if any("--config" in a.option_strings for a in sub._actions):
            with_config.add(name)
    assert with_config - {"demo"} == set(SCOPES) - {"demo"}
