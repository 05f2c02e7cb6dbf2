"""``ptft convert``: a pretraining checkpoint (any ZeRO stage, any world size) → a plain HF model dir.

Weights are consolidated by DeepSpeed's own ``zero_to_fp32`` (lazily, one tensor at a time, so
peak memory stays near the model size), loaded into a stock model of the architecture that was
trained (``BertForPreTraining``, ``RobertaForMaskedLM``, ``DistilBertForMaskedLM``,
``ModernBertForMaskedLM``, ...; the MLM decoder is tied to the word embeddings), written with
``save_pretrained`` (safetensors), and then checked: the export is reloaded with plain
``transformers`` (``AutoModelForMaskedLM``; BERT: ``AutoModelForPreTraining``) and its MLM (and NSP) logits are
compared with the consolidated model's and with the training engine's own logits, recorded in the
checkpoint when it was saved (``probe_logits.pt``, pretrain/probe.py): only the latter catches a
consolidation error. Past the tolerance (fp32: 1e-4 relative; bf16: 5e-2) convert fails and
writes nothing.
"""

from __future__ import annotations

import gc
import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ptft_dist.checkpoint.manager import CHECKPOINTS_DIR, CheckpointError, find_checkpoint, read_manifest
from ptft_dist.checkpoint.universal import read_meta
from ptft_dist.corpus.format import TOKENIZER_DIR
from ptft_dist.errors import UserError
from ptft_dist.fsutil import replace_dir, temp_name
from ptft_dist.log import get_logger
from ptft_dist.pretrain import export_checks, probe
from ptft_dist.pretrain.probe import probe_batch

log = get_logger("convert")
META = "ptft_export.json"
# the weights a sequence classifier adds to an MLM export (RoBERTa's head is classifier.*, DistilBERT's
# pre_classifier + classifier)
NEW_CLASSIFIER_KEYS = ("classifier.", "pre_classifier.")


class ConvertError(UserError, RuntimeError):
    """A checkpoint that cannot be exported as asked; the message names the file."""


@dataclass
class Source:
    """A resolved checkpoint: the step directory and the run it belongs to."""

    step_dir: Path
    run_dir: Path | None
    client: dict


def resolve_checkpoint(path: str | Path) -> Source:
    """RUN_DIR, RUN_DIR/checkpoints or a step directory → the checkpoint to export: the same answer
    a resume gets (``checkpoint.manager.find_checkpoint``: the verified step dir ``latest`` names)."""
    try:
        step_dir = find_checkpoint(path)
    except CheckpointError as exc:
        raise ConvertError(str(exc)) from None
    run_dir = step_dir.parent.parent if step_dir.parent.name == CHECKPOINTS_DIR else None
    return Source(step_dir, run_dir, read_manifest(step_dir).get("client", {}))


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from DeepSpeed ZeRO 1-3 partitions (any world size), a ZeRO-0 model state
    file, or an Accelerate ``model.safetensors``. Tensors are materialised one at a time."""
    if list(step_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name, lazy_mode=True)
        except Exception as exc:
            raise ConvertError(f"{step_dir}: DeepSpeed could not consolidate the ZeRO partitions ({exc})") from None
        return _Materialising(lazy)
    model_states = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if model_states:
        try:
            state = torch.load(model_states[0], map_location="cpu", mmap=True, weights_only=False)
        except Exception as exc:
            raise ConvertError(f"{model_states[0]}: unreadable ({exc})") from None
        return {k: v.float() for k, v in state["module"].items()}
    if (step_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(step_dir / "model.safetensors")).items()}
    raise ConvertError(f"{step_dir}: no model weights found")


class _Materialising(dict):
    """A dict of DeepSpeed lazy tensors that turns each into a real fp32 tensor when read."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return super().__getitem__(key).contiguous().float()

    def items(self):
        for k in self.keys():
            yield k, self[k]


def _load_into(model: torch.nn.Module, state: dict) -> None:
    """Put each checkpoint tensor into a model built on the meta device, without copying it.

    The model holds no memory of its own until a tensor is assigned, so the peak is one copy of
    the weights (plus DeepSpeed's flat partitions while it consolidates). Tied weights (decoder =
    word embeddings) may be present in the checkpoint or not; ``tie_weights`` links them."""
    from accelerate.utils import set_module_tensor_to_device

    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers())
    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in targets if k not in state and k not in tied and targets[k].is_meta]
    if missing:
        raise ConvertError(f"checkpoint lacks model weights: {', '.join(missing[:5])}")
    unexpected = [k for k in state if k not in targets]
    if unexpected:
        raise ConvertError(f"checkpoint has weights this {type(model).__name__} does not: "
                           f"{', '.join(list(unexpected)[:5])}")
    for k in list(state.keys()):
        if k in tied and not targets[k].is_meta:
            continue
        value = state[k]
        if tuple(value.shape) != tuple(targets[k].shape):
            raise ConvertError(f"weight {k}: checkpoint shape {tuple(value.shape)}, model {tuple(targets[k].shape)}")
        set_module_tensor_to_device(model, k, "cpu", value=value)
        del value
    model.tie_weights()
    still_empty = [k for k, t in model.state_dict().items() if t.is_meta]
    if still_empty:
        raise ConvertError(f"checkpoint lacks model weights: {', '.join(still_empty[:5])}")


def _max_diff(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], batch: dict) -> float:
    mask = batch["attention_mask"].bool()
    return max(probe.max_abs(a[0][mask] - b[0][mask]), probe.max_abs(a[1] - b[1]))


def max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, batch: dict) -> float:
    """Largest MLM (unpadded positions) or NSP logit difference between two pretraining models."""
    return _max_diff(probe.logits(a, batch), probe.logits(b, batch), batch)


def _current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def convert(src: str | Path, output: str | Path, dtype: str = "fp32", overwrite: bool = False,
            random_init: bool = False) -> dict:
    """Export and verify; returns a report (also written into the export as ptft_export.json).

    ``random_init`` exports the same architecture and tokenizer with freshly initialised weights
    (seed 0): the baseline that shows what pretraining bought. Nothing appears at ``output`` unless
    the export verified (docs/design.md, guarantees 5 and 8)."""
    _import_heavy_modules()  # before the memory baseline, so the report measures the weights
    t0 = time.time()
    out = Path(output)
    source = resolve_checkpoint(src)
    _check_request(out, dtype, overwrite, source)
    config, tok_dir = _model_config(source), _tokenizer_dir(source)

    baseline_mb = _current_rss_mb()
    model = _build_model(config, source, random_init)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    # the training engine's logits, recorded at checkpoint time (pretrain/probe.py), on their input
    recorded = None if random_init else probe.read(source.step_dir)
    batch = recorded["input"] if recorded else probe_batch(config)
    # reference logits now, so the checkpoint model is gone before the export is reloaded:
    # peak memory is then two copies of the weights (model + serialised bytes), never three
    reference = probe.logits(model, batch)
    export_checks.check_finite_logits(reference, str(source.step_dir))

    tmp = temp_name(out)
    try:
        _save_model(model, tmp, dtype)
        del model
        gc.collect()
        _copy_tokenizer(tok_dir, tmp)
        diff, engine_check = _verify_export(tmp, reference, batch, dtype, recorded, source.step_dir)
        report = _report(source, dtype, random_init, diff, model_bytes, baseline_mb, t0)
        report["engine_logits_check"] = engine_check
        (tmp / META).write_text(json.dumps(report, indent=2))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check = report["engine_logits_check"]
    if check["recorded"]:
        log.info(f"export matches the training engine's logits recorded at checkpoint time: relative error "
                 f"{check['relative_error']:.1e} (tolerance {check['tolerance']:g}, {check['engine_precision']} engine)")
    elif not random_init:
        log.warning(f"{source.step_dir} holds no {probe.PROBE_FILE} (written by an older ptft?): the export is "
                    "checked against the consolidated weights only, which cannot catch a consolidation error")
    log.info(f"{source.step_dir} → {out} ({dtype}); verified: max |logit diff| {report['max_abs_logit_diff']:.2e}; "
             f"memory: +{report['peak_rss_over_baseline_mb']:.0f} MB at peak for a {report['model_mb_fp32']:.1f} MB "
             f"fp32 model ({report['peak_rss_over_model_size']:.2f}x)")
    return report


def _import_heavy_modules() -> None:
    import accelerate.utils  # noqa: F401
    import deepspeed.utils.zero_to_fp32  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers
    from transformers import (  # noqa: F401 - transformers loads these lazily: now, not inside the measurement
        AutoModelForMaskedLM,
        AutoModelForPreTraining,
        AutoModelForSequenceClassification,
        BertConfig,
        BertForPreTraining,
    )

    transformers.logging.set_verbosity_error()  # the load report for the classifier head is expected noise


def _check_request(out: Path, dtype: str, overwrite: bool, source: Source) -> None:
    export_checks.check_output(out, source.step_dir, source.run_dir, overwrite)
    if dtype not in ("fp32", "bf16"):
        raise ConvertError(f"--dtype: {dtype!r} is not one of fp32, bf16")


def _model_config(source: Source):
    """The checkpoint's own model config (saved by the pretraining loop with every checkpoint;
    ``model_type`` says the architecture, BERT for runs older than that)."""
    from transformers import CONFIG_MAPPING

    from ptft_dist.pretrain.architectures import model_class

    config_dict = source.client.get("model_config")
    if not config_dict:
        raise ConvertError(f"{source.step_dir}: the checkpoint manifest has no model_config (not a ptft pretraining run?)")
    model_type = config_dict.get("model_type") or "bert"
    if model_type not in CONFIG_MAPPING:
        raise ConvertError(f"{source.step_dir}: model type {model_type!r} is unknown to this transformers")
    config = CONFIG_MAPPING[model_type].from_dict(
        {k: v for k, v in config_dict.items() if k not in ("transformers_version", "model_type")})
    config.architectures = [model_class(config).__name__]
    return config


def _tokenizer_dir(source: Source) -> Path:
    tok_dir = (source.run_dir / TOKENIZER_DIR) if source.run_dir else None  # copied there by `ptft pretrain`
    if tok_dir is None or not (tok_dir / "tokenizer.json").is_file():
        raise ConvertError(f"{source.step_dir}: no tokenizer/ beside the checkpoints (expected {tok_dir})")
    export_checks.check_run_tokenizer(tok_dir, source.client.get("tokenizer_hash"), source.step_dir)
    return tok_dir


def _build_model(config, source: Source, random_init: bool) -> torch.nn.Module:
    """A stock model of the trained architecture holding the checkpoint's weights (or seed-0 random ones)."""
    from accelerate import init_empty_weights

    from ptft_dist.pretrain.architectures import model_class

    cls = model_class(config)
    torch.manual_seed(0)
    if random_init:
        return cls(config)
    with init_empty_weights():
        model = cls(config)
    _load_into(model, consolidated_state_dict(source.step_dir))
    gc.collect()  # DeepSpeed's flat partitions are garbage once every tensor is materialised
    export_checks.check_finite_weights(model, source.step_dir)
    return model


def _save_model(model: torch.nn.Module, tmp: Path, dtype: str) -> None:
    export = model if dtype == "fp32" else model.to(torch.bfloat16)
    export.save_pretrained(str(tmp), safe_serialization=True)


def _copy_tokenizer(tok_dir: Path, tmp: Path) -> None:
    """The corpus tokenizer, byte for byte (vocab.txt included)."""
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)


def _verify_export(tmp: Path, reference: tuple[torch.Tensor, torch.Tensor], batch: dict, dtype: str,
                   recorded: dict | None, step_dir: Path) -> tuple[float, dict]:
    """Reload the export with plain transformers, no custom code: its logits must match the
    consolidated model's (the export wrote what was consolidated) and the training engine's,
    recorded at checkpoint time (what was consolidated is what was trained), and the encoder must
    load into a sequence classifier. Returns the max difference to the consolidated model and the
    engine check's report."""
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        AutoModelForPreTraining,
        AutoModelForSequenceClassification,
    )

    auto = AutoModelForPreTraining if AutoConfig.from_pretrained(str(tmp)).model_type == "bert" else AutoModelForMaskedLM
    reloaded = auto.from_pretrained(str(tmp), torch_dtype=torch.float32)
    got = probe.logits(reloaded, batch)
    diff = _max_diff(reference, got, batch)
    del reloaded
    gc.collect()
    if dtype == "fp32" and not diff <= 1e-5:  # NaN fails too; bf16 exports are rounded on purpose: checked against the engine below
        raise ConvertError(f"verification failed: max |logit difference| {diff:.2e} > 1e-05")
    engine_check = _check_against_engine(got, batch, recorded, dtype, step_dir)
    cls_model, info = AutoModelForSequenceClassification.from_pretrained(str(tmp), num_labels=2,
                                                                         output_loading_info=True)
    encoder_missing = [k for k in info["missing_keys"] if not k.startswith(NEW_CLASSIFIER_KEYS)]
    if encoder_missing:
        raise ConvertError(f"export does not load into {type(cls_model).__name__}: missing {encoder_missing[:5]}")
    del cls_model
    return diff, engine_check


def _check_against_engine(got: tuple[torch.Tensor, torch.Tensor], batch: dict, recorded: dict | None, dtype: str,
                          step_dir: Path) -> dict:
    """The export's logits against the engine's recorded ones; a ConvertError past the tolerance of
    the engine's precision and the export's dtype (pretrain/probe.py, TOLERANCE)."""
    if recorded is None:
        return {"recorded": False}
    err = probe.relative_error(got, (recorded["mlm"], recorded["nsp"]), batch)
    tol = max(float(recorded["tolerance"]), probe.TOLERANCE[dtype])
    if not err <= tol:  # NaN fails too
        raise ConvertError(
            f"verification failed: the export's logits differ from the training engine's (recorded at checkpoint "
            f"time in {step_dir / probe.PROBE_FILE}) by {err:.2e} (max |diff| / max |logit|) > tolerance {tol:g} "
            f"({recorded['precision']} engine, {dtype} export): the consolidated weights are not the trained ones")
    return {"recorded": True, "engine_precision": recorded["precision"], "relative_error": err, "tolerance": tol}


def _report(source: Source, dtype: str, random_init: bool, diff: float, model_bytes: int, baseline_mb: float,
            t0: float) -> dict:
    return {
        "source": str(source.step_dir.resolve()),
        "run_dir": str(source.run_dir.resolve()) if source.run_dir else None,
        "step": source.client.get("step"),
        "config_hash": source.client.get("config_hash"),
        "tokenizer_hash": source.client.get("tokenizer_hash"),
        "corpus": source.client.get("data", {}).get("corpus_fingerprint"),
        "dtype": dtype,
        "random_init": random_init,
        "backend": read_meta(source.step_dir),
        "max_abs_logit_diff": diff,
        "verified": True,
        "model_mb_fp32": round(model_bytes / 2**20, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_over_baseline_mb": round(_peak_rss_mb() - baseline_mb, 1),
        "peak_rss_over_model_size": round((_peak_rss_mb() - baseline_mb) / max(model_bytes / 2**20, 1e-9), 2),
        "seconds": round(time.time() - t0, 2),
    }
