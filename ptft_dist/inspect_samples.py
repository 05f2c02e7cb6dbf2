"""``ptft inspect CORPUS --samples N``: training samples exactly as the model sees them."""

from __future__ import annotations

import sys
from typing import Optional, TextIO

import numpy as np

from ptft_dist.config import DataConfig
from ptft_dist.stream import samples as S
from ptft_dist.stream.dataset import VALIDATION_SEED, PretrainingStream, load_vocab

_NSP_NAMES = {S.IS_NEXT: "IsNext", S.NOT_NEXT: "NotNext", S.IGNORE_INDEX: "-"}


def _token(vocab: list[str], i: int) -> str:
    return vocab[i] if 0 <= i < len(vocab) and vocab[i] else f"<{i}>"


def _render(vocab: list[str], ids: np.ndarray, orig: np.ndarray, labels: np.ndarray) -> str:
    """WordPiece pieces joined into words; a predicted position shows ``input{original}``."""
    words: list[str] = []
    for t, o, lab in zip(ids.tolist(), orig.tolist(), labels.tolist()):
        piece = _token(vocab, t)
        if lab != S.IGNORE_INDEX:
            ref = _token(vocab, o)
            piece = f"{piece}{{{ref[2:] if ref.startswith('##') else ref}}}"
        if piece.startswith("##") and words and not (words[-1].startswith("[") and words[-1].endswith("]")):
            words[-1] += piece[2:]
        else:
            words.append(piece)
    return " ".join(words)


def rank_positions(ds: PretrainingStream, epoch: int, n: int) -> np.ndarray:
    """The first ``n`` epoch positions the stream's rank receives, in order (independent of batch size)."""
    total = ds.num_samples(epoch)
    pos = ds.rank + ds.world_size * np.arange(n, dtype=np.int64)
    return pos[pos < total]


def print_samples(
    corpus: str,
    data_cfg: DataConfig,
    n: int,
    epoch: int,
    world_size: int,
    rank: int,
    ids_only: bool,
    split: str = "train",
    out: Optional[TextIO] = None,
) -> None:
    """Print the first ``n`` samples rank ``rank`` of ``world_size`` receives in ``epoch``.

    ``ids_only``: one global sample id per line (the stable id that exactly-once is about).
    Otherwise: position, id, IsNext/NotNext, provenance, segment A | segment B decoded with the
    masked positions marked ``model input{original token}``. ``split="validation"`` shows the fixed
    validation stream (epoch and seed are those of :func:`stream.build_validation_loader`).
    """
    out = out or sys.stdout
    ds = PretrainingStream(
        corpus, data_cfg, micro_batch_size=max(1, min(n, 64)), world_size=world_size, rank=rank, split=split,
        fixed_epoch=0 if split != "train" else None, seed=VALIDATION_SEED if split != "train" else None,
    )
    if split != "train":
        epoch = 0
    positions = rank_positions(ds, epoch, n)
    if ids_only:
        for s in range(0, len(positions), 256):
            for info in ds.describe(epoch, positions[s : s + 256]):
                print(info["sample_id"], file=out)
        return
    vocab = load_vocab(ds.corpus, data_cfg.storage_options)
    total = ds.num_samples(epoch)
    print(
        f"# {ds.corpus} [{split}] epoch {epoch} seed {ds.seed}: {total} samples; rank {rank}/{world_size} "
        f"receives positions {rank}, {rank + world_size}, ...; max_seq_len {ds.spec.max_seq_len}, "
        f"{'NSP+MLM' if ds.spec.nsp else 'MLM only'}, mask p={ds.spec.mlm_probability}"
        f"{', whole words' if ds.spec.whole_word_mask else ''}",
        file=out,
    )
    print("# predicted positions are shown as model-input{original}", file=out)
    shard_paths = [s.path for s in ds.shards]
    for s in range(0, len(positions), 64):
        pos = positions[s : s + 64]
        batch = ds.batch_at(epoch, pos)
        infos = ds.describe(epoch, pos)
        for row, info in enumerate(infos):
            length = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :length]
            labels = batch["labels"][row, :length]
            orig = np.where(labels != S.IGNORE_INDEX, labels, ids)
            types = batch["token_type_ids"][row, :length]
            n_pred = int((labels != S.IGNORE_INDEX).sum())
            print(
                f"\n[{s + row}] position {info['position']}  sample id {info['sample_id']}  "
                f"{_NSP_NAMES.get(info['nsp_label'], info['nsp_label'])}  {length} tokens  {n_pred} predicted",
                file=out,
            )
            a0, a1 = info["a_sentences"]
            tr = info["truncated"]
            print(
                f"  A: {shard_paths[info['a_shard']]} doc {info['a_doc']} (id {info['a_doc_id']:#x}) "
                f"sentences {a0}..{a1 - 1}" + (f", cut {tr[0]} front / {tr[1]} back" if tr[0] or tr[1] else ""),
                file=out,
            )
            if info["b_sentences"] is not None:
                b0, b1 = info["b_sentences"]
                print(
                    f"  B: {shard_paths[info['b_shard']]} doc {info['b_doc']} (id {info['b_doc_id']:#x}) "
                    f"sentences {b0}..{b1 - 1}" + (f", cut {tr[2]} front / {tr[3]} back" if tr[2] or tr[3] else ""),
                    file=out,
                )
            seg_b = types == 1
            first_sep = int(np.argmax(ids == ds.specials.sep)) if (ids == ds.specials.sep).any() else length
            a_part = slice(0, first_sep + 1)
            print(f"  {_render(vocab, ids[a_part], orig[a_part], labels[a_part])}", file=out)
            if seg_b.any():
                print(f"  | {_render(vocab, ids[seg_b], orig[seg_b], labels[seg_b])}", file=out)
            elif length > first_sep + 1:
                rest = slice(first_sep + 1, length)
                print(f"  | {_render(vocab, ids[rest], orig[rest], labels[rest])}", file=out)
