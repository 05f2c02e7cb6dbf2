#!/usr/bin/env python3
"""One table from a fine-tuning grid run by slurm/finetune.sbatch.

    python slurm/summarize_finetune.py OUT [--grid GRID.tsv] [--md PATH] [--tsv PATH]

Reads every ``OUT/*/results.json`` (shaped ``{"method": ..., "validation": {"accuracy": ...},
"test": {"accuracy": ..., "macro_f1": ...}}``; nested numbers are flattened to ``test.accuracy``...)
and the row records ``OUT/slurm/row-*/row.json`` that the template writes (config, seed, lr, exit
status). ``--grid`` also lists rows that never ran. Writes ``OUT/summary.md`` (one line per row,
then mean ± std over seeds of each config/lr/method with more than one seed) and ``OUT/summary.tsv``
(full precision, with a ``task`` column), and prints the Markdown. A grid of several task types
(``task.task_type`` of results.json: classification, regression, token_classification,
extractive_qa) gets one Markdown section per task type, each with that task's own metric columns. Exit status 0 even when rows failed: they are listed
with their state. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

META = ("row", "config", "seed", "lr", "method", "state")
NOT_METRICS = frozenset(META) | {"task"}


def row_name(index: int) -> str:
    """The directory name slurm/finetune.sbatch gives grid row ``index``."""
    return f"row-{index:03d}"


def read_grid(path: Path) -> dict[str, dict[str, str]]:
    """Row name → {config, seed, lr} from the grid TSV (blank and # lines skipped, header first)."""
    lines = [ln.rstrip("\r\n") for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return {}
    header = [h.strip() for h in lines[0].split("\t")]
    rows = {}
    for i, line in enumerate(lines[1:]):
        cells = [c.strip() for c in line.split("\t")]
        rec = dict(zip(header, cells + [""] * (len(header) - len(cells))))
        rows[row_name(i)] = {k: rec.get(k, "") for k in ("config", "seed", "lr")}
    return rows


def flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)


def _load_json(path: Path) -> tuple[dict | None, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"unreadable {path.name}: {exc}"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, ""


def collect(out: Path, grid: dict[str, dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """One dict per row: META keys plus flattened ``validation.*`` / ``test.*`` metrics."""
    rows: dict[str, dict[str, Any]] = {}
    for name, g in (grid or {}).items():
        rows[name] = {"row": name, **g, "state": "not run"}
    for rec_path in sorted((out / "slurm").glob("row-*/row.json")):
        rec, err = _load_json(rec_path)
        name = rec_path.parent.name
        row = rows.setdefault(name, {"row": name})
        if rec is None:
            row["state"] = err
            continue
        for k in ("config", "seed", "lr"):
            if rec.get(k) not in (None, ""):
                row[k] = str(rec[k])
        state = rec.get("state", "?")
        if state == "failed":
            state = f"failed (exit {rec.get('exit_code')})"
        row["state"] = state
    for res_path in sorted(out.glob("*/results.json")):
        name = res_path.parent.name
        if name == "slurm":
            continue
        row = rows.setdefault(name, {"row": name})
        data, err = _load_json(res_path)
        if data is None:
            row["state"] = err
            continue
        metrics: dict[str, float] = {}
        for split in ("validation", "test"):
            flatten(split, data.get(split, {}), metrics)
        row.update(metrics)
        row["method"] = str(data.get("method", ""))
        task = data.get("task")
        row["task"] = str(task.get("task_type", "")) if isinstance(task, dict) else ""
        for k in ("config", "seed", "lr"):  # a results.json that names them fills gaps
            if not row.get(k) and data.get(k) not in (None, ""):
                row[k] = str(data[k])
        if row.get("state") in (None, "not run", "running", "completed"):
            row["state"] = "ok"
    return [rows[k] for k in sorted(rows)]


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    names = {k for r in rows for k in r if k not in NOT_METRICS}
    order = {"validation": 0, "test": 1}
    return sorted(names, key=lambda k: (order.get(k.split(".")[0], 2), k))


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in body)])


def groups(rows: list[dict[str, Any]], metrics: list[str]) -> list[list[str]]:
    """mean ± std over seeds of rows sharing config, lr and method (only groups of 2+ finished rows)."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("state") == "ok":
            by.setdefault((r.get("config", ""), r.get("lr", ""), r.get("method", "")), []).append(r)
    body = []
    for (config, lr, method), members in sorted(by.items()):
        if len(members) < 2:
            continue
        cells = [config, lr, method, str(len(members))]
        for m in metrics:
            vals = [r[m] for r in members if isinstance(r.get(m), float)]
            if not vals:
                cells.append("")
            elif len(vals) == 1:
                cells.append(_fmt(vals[0]))
            else:
                cells.append(f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}")
        body.append(cells)
    return body


def _section(rows: list[dict[str, Any]], level: str) -> list[str]:
    """The rows' table with their own metric columns, then mean ± std over seeds."""
    metrics = metric_columns(rows)
    header = list(META) + metrics
    md = [_md_table(header, [[_fmt(r.get(k)) for k in header] for r in rows])]
    agg = groups(rows, metrics)
    if agg:
        md += ["", f"{level} Mean ± std over seeds", "", _md_table(["config", "lr", "method", "n", *metrics], agg)]
    return md


def render(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(Markdown, TSV) text."""
    md = [f"# Fine-tuning grid: {len(rows)} row(s), {sum(r.get('state') == 'ok' for r in rows)} finished", ""]
    tasks = sorted({r.get("task", "") for r in rows if r.get("task")})
    if len(tasks) <= 1:
        md += _section(rows, "##")
    else:  # one table per task type: NER's entity F1 and QA's exact match do not share columns
        for task in tasks + [""]:
            members = [r for r in rows if r.get("task", "") == task]
            if members:
                md += [f"## {task or 'rows without results'}: {len(members)} row(s)", "", *_section(members, "###"), ""]
    metrics = metric_columns(rows)
    header = list(META) + ["task"] + metrics
    tsv = ["\t".join(header)]
    tsv += ["\t".join(repr(r[k]) if isinstance(r.get(k), float) else _fmt(r.get(k)) for k in header) for r in rows]
    return "\n".join(md) + "\n", "\n".join(tsv) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="PTFT_OUT of slurm/finetune.sbatch")
    p.add_argument("--grid", type=Path, help="the grid TSV (also lists rows that never ran)")
    p.add_argument("--md", type=Path, help="Markdown output (default OUT/summary.md)")
    p.add_argument("--tsv", type=Path, help="TSV output (default OUT/summary.tsv)")
    args = p.parse_args(argv)
    if not args.out.is_dir():
        print(f"summarize_finetune: error: {args.out} is not a directory", file=sys.stderr)
        return 2
    grid = None
    if args.grid:
        if not args.grid.is_file():
            print(f"summarize_finetune: error: {args.grid}: no such file", file=sys.stderr)
            return 2
        grid = read_grid(args.grid)
    rows = collect(args.out, grid)
    if not rows:
        print(f"summarize_finetune: error: no results.json under {args.out}/*/ and no row records", file=sys.stderr)
        return 1
    md, tsv = render(rows)
    (args.md or args.out / "summary.md").write_text(md)
    (args.tsv or args.out / "summary.tsv").write_text(tsv)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
