"""Regenerate docs/configuration.md from the config schema (tests/test_config.py checks it is current)."""

from pathlib import Path

from ptft_dist.config_docs import schema_reference

HEADER = """# Configuration reference

Generated from `ptft_dist/config.py` and `ptft_dist/config_rules.py` by `python scripts/gen_config_docs.py`; `tests/test_config.py` keeps it in sync.
Every key can be set in the YAML file given with `--config` (sections as mappings) or on the command line as
`section.key=value` (e.g. `train.zero_stage=3`, `optim.lr=1e-4`). Unknown keys fail with the closest valid key;
a value outside its range (column "range", from `ptft_dist/config_rules.py`; floats must also be finite) fails
at load, naming the key. Each command reads only some sections: a key it would ignore is refused
([refusals.md](refusals.md)).

"""

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    out.write_text(HEADER + schema_reference())
    print(f"wrote {out}")
