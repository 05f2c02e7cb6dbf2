"""Config schema: YAML + dotted overrides, type checks, closest-key hints, resolved copy."""

from pathlib import Path

import pytest
import yaml

from ptft_dist.config import Config, ConfigError, config_hash, load_config, save_resolved
from ptft_dist.config_docs import schema_reference


def test_yaml_and_overrides_combine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prepare:\n  workers: 3\n  tokenizer:\n    vocab_size: 1000\n")
    cfg = load_config(path, ["prepare.tokenizer.vocab_size=2000", "prepare.dedup.threshold=0.7",
                             "prepare.tokenizer.path=/x/y", "data.whole_word_mask=true"])
    assert cfg.prepare.workers == 3
    assert cfg.prepare.tokenizer.vocab_size == 2000
    assert cfg.prepare.dedup.threshold == pytest.approx(0.7)
    assert cfg.prepare.tokenizer.path == "/x/y"
    assert cfg.data.whole_word_mask is True


def test_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n")
    assert load_config(path, ["optim.eps=1e-8"]).optim.lr == pytest.approx(1e-4)
    assert load_config(None, ["optim.eps=1e-8"]).optim.eps == pytest.approx(1e-8)


def test_int_is_accepted_for_float_and_none_for_optional():
    cfg = load_config(None, ["prepare.shard_size_mb=2", "prepare.tokenizer.path=null"])
    assert cfg.prepare.shard_size_mb == 2.0 and isinstance(cfg.prepare.shard_size_mb, float)
    assert cfg.prepare.tokenizer.path is None


@pytest.mark.parametrize(
    "override, needle",
    [
        ("prepare.tokenizer.vocab_sise=10", "did you mean 'prepare.tokenizer.vocab_size'"),
        ("prepar.workers=2", "did you mean 'prepare'"),
        ("prepare.workers=two", "prepare.workers: expected an integer"),
        ("prepare.executor=k8s", "not one of ['local', 'slurm']"),
        ("prepare.dedup.near=maybe", "expected true/false"),
        ("prepare.workers", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_unknown_key_in_yaml_names_file_and_closest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("prepare:\n  shard_size_mbs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "prepare.shard_size_mb" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "x.yaml"
    bad.write_text("prepare: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_copy_round_trips(tmp_path):
    cfg = load_config(None, ["prepare.workers=5", "data.max_seq_len=256"])
    path = save_resolved(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(Config()) != config_hash(cfg)
    assert yaml.safe_load(path.read_text())["prepare"]["workers"] == 5


def test_schema_reference_lists_nested_keys():
    ref = schema_reference()
    assert "`prepare.tokenizer.vocab_size`" in ref and "`data.mlm_probability`" in ref


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_presets_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_configuration_docs_are_in_sync():
    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert schema_reference() in doc, "run: python scripts/gen_config_docs.py"


def test_cli_overrides_may_follow_options_and_launcher_args_are_dropped():
    import pytest as _pytest

    from ptft_dist.cli import build_parser, parse_command_line

    args = parse_command_line(build_parser(), ["finetune", "-c", "x.yaml", "finetune.epochs=2", "--method", "lora",
                                               "--local_rank=1", "finetune.lr=3e-4", "train.seed=7"])
    assert args.method == "lora"
    assert args.overrides == ["finetune.epochs=2", "finetune.lr=3e-4", "train.seed=7"]
    with _pytest.raises(SystemExit):  # a stray word that is neither an option nor key=value
        parse_command_line(build_parser(), ["finetune", "-c", "x.yaml", "a.b=1", "--method", "lora", "oops"])


def test_cli_imports_nothing_heavy_until_a_command_runs():
    import subprocess
    import sys

    code = ("import sys, ptft_dist.cli; print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith(('ptft_dist', 'torch', 'numpy', 'yaml')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout.split()
    assert out == ["ptft_dist", "ptft_dist.cli", "ptft_dist.errors", "ptft_dist.log"]
