"""docs/configuration.md, generated from the schema (ptft_dist/config.py) and the ranges
(ptft_dist/config_rules.py) by ``python scripts/gen_config_docs.py``; tests/test_config.py keeps it in sync."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from ptft_dist.config import Config
from ptft_dist.config_rules import RANGES


def _field_notes(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field line in the class source: the reference's description."""
    import inspect
    import re

    notes = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): .*?#\s*(.+)$", line)
        if m:
            notes[m.group(1)] = m.group(2).strip()
    return notes


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " \\| ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return (_type_name(inner[0]) if len(inner) == 1 else " \\| ".join(map(_type_name, inner))) + " (or null)"
    if get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def schema_reference() -> str:
    """Markdown reference of every key: type, default, admissible range and meaning (docs/configuration.md)."""
    lines = ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        notes = _field_notes(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rng = RANGES.get(prefix + f.name)
            allowed = rng.text() if rng else ""
            meaning = notes.get(f.name, "").replace("|", "\\|")  # a bare | would split the table cell
            lines.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{default!r}` | {allowed} | {meaning} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"
