"""Parameter counts (ptft_dist/metrics/parameters.py): tied weights once, frozen ones not trainable, ZeRO-3 sizes."""

from __future__ import annotations

import torch
from torch import nn

from ptft_dist.metrics.parameters import count_parameters


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 10, bias=False)
        self.decoder.weight = self.embed.weight  # tied: counted once, as embedding


def test_counts_split_embedding_and_trainable():
    model = Tiny()
    model.body.bias.requires_grad_(False)
    assert count_parameters(model) == {"total": 40 + 20, "trainable": 40 + 16, "embedding": 40, "non_embedding": 20}


def test_zero3_partitions_report_their_full_size():
    model = Tiny()
    for p in model.parameters():  # what ZeRO-3 leaves on a rank: an empty shard and the full size
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert count_parameters(model)["total"] == 60
