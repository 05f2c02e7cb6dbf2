"""``ptft_varlen``: packed-sequence attention with PyTorch's own kernels, registered with transformers.

Why: transformers' BERT only skips pad tokens through the flash-attn package (``flash_attention_2``),
which most machines cannot install. This attention function takes a packed batch -- the real tokens
of the samples concatenated into one (1, T) row, with ``cu_seq_lens_q/k`` (int32, cumulative
lengths: one more entry than sequences) and ``max_length_q/k`` -- and keeps attention inside each
sample. With packed rows (``data.pack_samples``) the sequences are chunks, several to a row of the
batch, and the pretrainer also passes the rows (``ptft_rows_cu``, ``ptft_rows_max``). Every other layer of the
encoder (embeddings, linears, FFN) then runs on real tokens only.

Which kernel runs (:func:`choose_kernel`), per call:

* ``varlen`` -- ``torch.nn.attention.varlen.varlen_attn`` (flash, in torch): CUDA, fp16/bf16, and no
  attention dropout in this call (eval, or ``attention_probs_dropout_prob`` 0). It has no dropout
  and no fp32.
* ``pad_around`` -- CUDA otherwise (training with attention dropout, as BERT's recipe has 0.1; or
  fp32): the packed q/k/v are scattered to (B, max_len), one SDPA call with a key-padding mask and
  the requested dropout, gathered back. Exactly BERT's attention; the linears stay packed. We keep
  BERT's regularisation rather than silently drop it: set the dropout to 0 for the flash kernel.
  Packed rows are scattered to their rows, not their chunks, with a block-diagonal mask (a chunk
  sees its own tokens only): the cost of the padded row batch, never (chunks x longest chunk).
* ``per_sample`` -- CPU: one SDPA call per sample on ``split`` views (no padding at all, dropout
  supported). Measured fastest on CPU (docs: /work/tools/research/15-packing.md §2); flex_attention
  has no CPU backward in torch 2.13 and varlen_attn no CPU kernel.

Unpacked calls (no ``cu_seq_lens_q``: fine-tuning batches, inference, ``unpad`` off) are plain
``sdpa`` with its mask, so a model built with this name behaves exactly like ``sdpa`` there. The
mask builder is registered too: without it transformers gives a custom name *no* mask, and padded
batches would attend to pads.

Exports stay plain HF: ``save_pretrained`` writes no attention implementation to ``config.json``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ptft_dist.log import get_logger

log = get_logger("attention")

NAME = "ptft_varlen"
KERNELS = ("varlen", "pad_around", "per_sample")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_announced: set[str] = set()


def choose_kernel(device_type: str, dtype: torch.dtype, dropout: float) -> str:
    """The kernel for a packed call: see the module docstring."""
    if device_type != "cuda":
        return "per_sample"
    if dtype in _FLASH_DTYPES and not dropout:
        return "varlen"
    return "pad_around"


def _announce(kernel: str, dtype: torch.dtype, dropout: float) -> None:
    if kernel in _announced or torch.compiler.is_compiling():
        return
    _announced.add(kernel)
    why = {
        "varlen": "torch varlen_attn (flash)",
        "pad_around": f"SDPA around each sample (varlen_attn has {'no dropout' if dropout else 'no ' + str(dtype)})",
        "per_sample": "one SDPA call per sample (CPU)",
    }[kernel]
    log.info("%s: packed batches run %s", NAME, why)


def varlen_kernel(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scaling):
    """torch's flash varlen kernel on (T, H, D) tensors (CUDA, sm80+, fp16/bf16, head dim % 8 == 0)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling)


def token_places(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of the ``total`` packed tokens' sequence index and its column within that sequence,
    from cumulative lengths ``cu`` (no host sync)."""
    lens = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens.long(), output_size=total)
    return seg, torch.arange(total, device=cu.device) - cu[:-1].long()[seg]


def pad_around(q, k, v, cu_q, max_q: int, scaling, dropout: float, rows_cu=None, rows_max: int | None = None):
    """Scatter packed (T, H, D) to (B, max_q), one masked SDPA call, gather back; no host sync.

    With ``rows_cu``/``rows_max`` (packed rows) the grid is the batch's rows and the mask is
    block-diagonal: a token attends to the tokens of its own sequence; a pad slot attends to itself
    only (an all-masked row would give NaN, and NaN * 0 in the backward would reach real gradients).
    """
    total, heads, dim = q.shape
    seq, col = token_places(cu_q, total)
    if rows_cu is None:
        n, width = cu_q.numel() - 1, max_q
        keep = (torch.arange(width, device=q.device)[None] < (cu_q[1:] - cu_q[:-1])[:, None])[:, None, None, :]
        slot = seq * width + col
    else:
        n, width = rows_cu.numel() - 1, int(rows_max)
        row, row_col = token_places(rows_cu.to(q.device), total)
        slot = row * width + row_col  # each token's place in the (rows * width) grid
        owner = -1 - torch.arange(n * width, device=q.device)  # pads: a sequence of their own
        owner = owner.index_copy(0, slot, seq).view(n, 1, width)
        keep = (owner[:, :, :, None] == owner[:, :, None, :])

    def padded(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(n * width, heads, dim).index_copy(0, slot, x).view(n, width, heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=keep, dropout_p=dropout,
                                         scale=scaling)
    return out.transpose(1, 2).reshape(n * width, heads, dim).index_select(0, slot)


@torch.compiler.disable  # lengths from .tolist() would specialise a compiled graph per batch (a recompile each)
def per_sample(q, k, v, cu_q, scaling, dropout: float) -> torch.Tensor:
    """One SDPA call per sample on (H, l, D) views; ``split``'s backward is one cat (slices' are not)."""
    lens = (cu_q[1:] - cu_q[:-1]).tolist()  # cu_q lives on the CPU here: no device sync
    qs, ks, vs = (x.transpose(0, 1).split(lens, 1) for x in (q, k, v))
    outs = [F.scaled_dot_product_attention(a, b, c, dropout_p=dropout, scale=scaling) for a, b, c in zip(qs, ks, vs)]
    return torch.cat(outs, 1).transpose(0, 1)


def packed_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scaling, dropout: float = 0.0,
                     kernel: str | None = None, rows_cu=None, rows_max: int | None = None) -> torch.Tensor:
    """Attention within each sample of packed (T, H, D) q/k/v; ``kernel`` forces one of :data:`KERNELS`;
    ``rows_cu``/``rows_max``: the batch rows the sequences are packed in (only ``pad_around`` uses them)."""
    kernel = kernel or choose_kernel(q.device.type, q.dtype, dropout)
    _announce(kernel, q.dtype, dropout)
    if kernel == "varlen":
        if dropout:
            raise ValueError(f"{NAME}: torch varlen_attn has no attention dropout (got {dropout})")
        return varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scaling)
    if cu_k is not cu_q and not torch.equal(cu_q, cu_k):  # BERT passes one tensor for both
        raise ValueError(f"{NAME}: the {kernel} kernel needs cu_seq_lens_k == cu_seq_lens_q (self-attention)")
    if kernel == "pad_around":
        return pad_around(q, k, v, cu_q, max_q, scaling, dropout, rows_cu, rows_max)
    if kernel == "per_sample":
        return per_sample(q, k, v, cu_q, scaling, dropout)
    raise ValueError(f"{NAME}: unknown kernel {kernel!r} (one of {KERNELS})")


def ptft_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                          ptft_rows_cu=None, ptft_rows_max=None, **kwargs):
    """transformers attention interface: (B, H, S, D) q/k/v in, ((B, S, H, D), None) out."""
    if cu_seq_lens_q is None:  # a padded batch: exactly sdpa, with its mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(f"{NAME}: a packed batch is one (1, T) row with cu_seq_lens and no attention_mask")
    cu_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    max_q = int(max_length_q)
    max_k = max_q if max_length_k is None else int(max_length_k)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    out = packed_attention(q, k, v, cu_seq_lens_q, cu_k, max_q, max_k, scaling, float(dropout or 0.0),
                           rows_cu=ptft_rows_cu, rows_max=ptft_rows_max)
    return out[None], None


def register() -> None:
    """Make ``attn_implementation="ptft_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, ptft_varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # else padded batches would get no mask at all


register()
