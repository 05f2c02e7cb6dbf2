"""Parameter counts, written once for both stages (pretraining reports non-embedding size, the
usual measure of model scale; fine-tuning reports how much of the model trains)."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters: ``total``, ``trainable`` (requires_grad), ``embedding`` (the word /
    position / type tables of every ``nn.Embedding``; a decoder tied to them counts here once) and
    ``non_embedding`` (the rest).

    Uses DeepSpeed's ``ds_numel`` when present, so the counts are right under ZeRO-3 partitioning.
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    total = trainable = embedding = 0
    for p in model.parameters():  # parameters() de-duplicates tied weights
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
        embedding += n if id(p) in embedding_ids else 0
    return {"total": total, "trainable": trainable, "embedding": embedding, "non_embedding": total - embedding}
