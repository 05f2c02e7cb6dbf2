"""The plan as text (``ptft plan``) or JSON (``ptft plan --json``)."""

from __future__ import annotations

import json
from typing import Any


def to_json(plan: dict) -> str:
    return json.dumps(plan, indent=2, sort_keys=False)


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:.1f} {unit}".rstrip()


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _option_rows(plan: dict) -> list[str]:
    head = (f"{'option':<20} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'buffers':>7} {'total':>7}  "
            f"{'fits':<4} {'max mb':>6} {'mb x acc':>9} {'comm/rank':>10} {'compute':>9} {'exposed':>9} "
            f"{'step':>9} {'tokens/s':>9}")
    rows = [head, "-" * len(head)]
    opts: list[dict[str, Any]] = list(plan["options"])
    if plan.get("configured"):
        opts.append(plan["configured"])
    for o in opts:
        m = o["memory_gib"]
        fits = "yes" if o["fits"] else "NO"
        mb = f"{o['micro_batch']}x{o['grad_accum']}" if o["micro_batch"] else "-"
        comm = _si(o["comm"]["wire_bytes_per_rank"], "B") if "comm" in o else "-"
        rows.append(
            f"{o['label']:<20} {m['params']:>7.2f} {m['grads']:>7.2f} {m['optimizer']:>7.2f} {m['activations']:>7.2f} "
            f"{m['buffers'] + m['runtime']:>7.2f} {m['total']:>7.2f}  {fits:<4} {o['max_micro_batch']:>6} {mb:>9} "
            f"{comm:>10} {_secs(o.get('compute_s')):>9} {_secs(o.get('exposed_comm_s')):>9} "
            f"{_secs(o.get('step_s')):>9} {_si(o.get('tokens_per_s')):>9}")
    return rows


def _scaling_rows(plan: dict) -> list[str]:
    rows = [f"{'nodes':>5} {'ranks':>6} {'mb x acc':>9} {'step':>9} {'tokens/s':>10} {'efficiency':>10}"]
    for p in plan["scaling"]:
        mb = f"{p['micro_batch']}x{p['grad_accum']}" if p["micro_batch"] else "-"
        eff = f"{p['efficiency']:.1%}" if p["efficiency"] is not None else "n/a"
        rows.append(f"{p['nodes']:>5} {p['ranks']:>6} {mb:>9} {_secs(p['step_s']):>9} {_si(p['tokens_per_s']):>10} "
                    f"{eff:>10}")
    return rows


def to_text(plan: dict) -> str:
    w, hw, job, comp, best = plan["workload"], plan["hardware"], plan["job"], plan["compute"], plan["recommended"]
    lines = [
        f"model     {w['description']}",
        f"job       {job['nodes']} node(s) x {job['gpus_per_node']} {hw['gpu']} = {job['ranks']} ranks, global batch "
        f"{job['global_batch']} ({job['per_rank_batch']} per rank), overlap_comm {str(job['overlap_comm']).lower()}",
        f"memory    {hw['memory_per_rank_gib']:.1f} GiB per rank ({hw['source']})",
        f"network   {hw['interconnect']}: {hw['nics_per_node']} x {hw['link_gbit_s']:g} Gb/s per node, "
        f"{hw['link_efficiency']:.0%} usable, {hw['link_latency_us']:g} us ({hw['interconnect_source']})",
        f"compute   {_si(comp['flops_per_s_per_rank'], 'FLOP/s')} per rank: {comp['source']}",
        *([f"note      {job['note']}"] if job.get("note") else []),
        "",
        "per rank, GiB (buffers include the runtime reserve); comm = bytes one rank sends per optimizer step",
        *_option_rows(plan),
        "",
        f"recommended: {best['label']}, micro-batch {best['micro_batch']} x accumulation {best['grad_accum']}: "
        f"{_secs(best['step_s'])} per step, {_si(best['tokens_per_s'])} tokens/s, "
        f"{best['memory_gib']['total']:.2f} of {hw['memory_per_rank_gib']:.1f} GiB",
        "",
        f"scaling ({best['label']}, same global batch):",
        *_scaling_rows(plan),
        "",
        f"run it:  {plan['sbatch']}",
    ]
    return "\n".join(lines) + "\n"
