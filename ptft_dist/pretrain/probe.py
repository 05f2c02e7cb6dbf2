"""The training engine's own logits on a fixed probe batch, recorded in every checkpoint, so that
``ptft convert`` can check its export against what was trained rather than against itself.

Comparing an export with its own reload cannot catch a consolidation error (partitions put
together in the wrong order, a missing shard, a tensor that is not the trained one): both sides
hold the same wrong weights. So at checkpoint time every rank runs the engine's model on
:func:`probe_batch` (a collective under ZeRO-3: the forward gathers the partitions) and rank 0
writes ``probe_logits.pt`` (input batch, MLM and NSP logits, the engine's precision) into the
step directory, listed in its ``COMPLETE`` manifest. ``ptft convert`` runs the export on the same
input and fails when the logits differ by more than :data:`TOLERANCE`.

The error measure is ``max |export − recorded| / max |recorded|`` over the real (unpadded) MLM
positions and the NSP logits: one number, independent of the logit scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

PROBE_FILE = "probe_logits.pt"

# Largest relative logit error an export may show against the recorded engine logits, by the
# precision of the two computations (the engine's at checkpoint time, the export's dtype).
# fp32: what consolidation + safetensors + reload give is float rounding of a different summation
# order (measured ~1e-7 on the test models); 1e-4 leaves room for deep models and other BLAS
# kernels, and a swapped or missing tensor is off by O(1). Half precision: the engine computes
# in bf16/fp16 with rounded weights (and a bf16 export stores rounded weights): ~1e-2 is normal.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}


def probe_batch(config: Any, n: int = 4, seq: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch with padding (and both segments, for a model with token types): enough
    to exercise every weight."""
    g = torch.Generator().manual_seed(seed)
    table = getattr(config, "max_position_embeddings", None)
    if table is not None and getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
        table -= int(config.pad_token_id) + 1  # RoBERTa's positions start after the padding index
    seq = min(seq, int(table)) if table else seq
    ids = torch.randint(5, config.vocab_size, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1, seq // 2 :] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "model_type", "") == "bert" and getattr(config, "type_vocab_size", 0) >= 2:
        types = torch.zeros(n, seq, dtype=torch.long)
        types[:, seq // 2 :] = 1
        batch["token_type_ids"] = types
    return batch


def logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLM, NSP) logits of a ``BertForPreTraining`` or ``*ForMaskedLM`` in eval mode, as fp32 CPU
    tensors; a model without an NSP head gives an empty (n, 0) NSP tensor."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    if hasattr(out, "prediction_logits"):
        return out.prediction_logits.float().cpu(), out.seq_relationship_logits.float().cpu()
    return out.logits.float().cpu(), torch.zeros(out.logits.shape[0], 0)


def max_abs(t: torch.Tensor) -> float:
    """``max |t|``; 0 for an empty tensor (no NSP head)."""
    return float(t.abs().max()) if t.numel() else 0.0


def relative_error(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], batch: dict) -> float:
    """``max |a − b| / max |b|`` over unpadded MLM positions and the NSP logits (``b``: the reference)."""
    mask = batch["attention_mask"].bool()
    diff = max(max_abs(a[0][mask] - b[0][mask]), max_abs(a[1] - b[1]))
    scale = max(max_abs(b[0][mask]), max_abs(b[1]), 1e-12)
    return diff / scale


def record(engine: Any) -> dict:
    """The engine's logits on the probe batch. EVERY rank calls it (ZeRO-3 gathers parameters
    inside the forward); the result is the same on every rank."""
    hf_model = engine.module.hf_model  # shares the engine module's (partitioned) children
    batch = probe_batch(hf_model.config)
    was_training = engine.module.training
    try:
        mlm, nsp = logits(hf_model, batch)
    finally:
        engine.train(was_training)  # the engine's module, recursively: dropout back on for training
    return {"input": batch, "mlm": mlm, "nsp": nsp, "precision": engine.precision_name,
            "tolerance": TOLERANCE.get(engine.precision_name, TOLERANCE["bf16"])}


def write(probe: dict, step_dir: Path, is_main: bool) -> list[Path]:
    """Rank 0 writes ``probe_logits.pt`` into the checkpoint; returns the files written here."""
    if not is_main:
        return []
    path = Path(step_dir) / PROBE_FILE
    torch.save(probe, path)
    return [path]


def read(step_dir: Path) -> Optional[dict]:
    """The recorded probe of a checkpoint, or None (written before probes were recorded)."""
    path = Path(step_dir) / PROBE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
