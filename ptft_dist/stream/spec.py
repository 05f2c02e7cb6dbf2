"""What defines a sample apart from the corpus and the randomness keys: the data settings that
shape it (:class:`SampleSpec`) and the special token ids it is framed and masked with.

Both the sample builder (samples.py) and the masking (masking.py) read these; the stream's
``sample_fingerprint`` hashes the spec, so a resume notices when the samples would differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    mask: int
    unk: int = -1
    extra: tuple[int, ...] = ()  # the tokenizer's other special tokens (never masked, never a random pick)

    @classmethod
    def from_manifest(cls, special_tokens: dict) -> SpecialIds:
        def get(*names: str, default: Optional[int] = None) -> int:
            for n in names:
                for key in (n, f"[{n.upper()}]", n.upper()):
                    if key in special_tokens:
                        return int(special_tokens[key])
            if default is None:
                raise KeyError(f"special token '{names[0]}' missing from manifest (has: {sorted(special_tokens)})")
            return default

        ids = cls(pad=get("pad"), cls=get("cls"), sep=get("sep"), mask=get("mask"), unk=get("unk", default=-1))
        roles = set(ids.all())
        extra = tuple(sorted({int(v) for v in special_tokens.values()} - roles))
        return cls(ids.pad, ids.cls, ids.sep, ids.mask, ids.unk, extra)

    def all(self) -> list[int]:
        return [i for i in (self.pad, self.cls, self.sep, self.mask, self.unk, *self.extra) if i >= 0]


@dataclass(frozen=True)
class SampleSpec:
    """What defines a sample (everything except the corpus and the randomness keys)."""

    max_seq_len: int = 128
    nsp: bool = True
    short_seq_prob: float = 0.1
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    whole_word_mask: bool = False
    max_predictions_per_seq: int = 0  # 0 = no cap
    pack_samples: bool = False  # MLM only: a row holds consecutive chunks up to max_seq_len (samples.pack_chunks)

    def __post_init__(self) -> None:
        if self.max_seq_len < (5 if self.nsp else 3):
            raise ValueError(f"max_seq_len {self.max_seq_len} too small")
        if self.pack_samples and self.nsp:
            raise ValueError("pack_samples needs nsp=False (an NSP pair fills its own row)")
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability {self.mlm_probability} not in [0, 1]")
        if self.mask_replace_prob < 0 or self.random_replace_prob < 0 or (
            self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9
        ):
            raise ValueError("mask_replace_prob + random_replace_prob must be in [0, 1]")

    @property
    def max_num_tokens(self) -> int:
        """Content tokens per sample (without [CLS]/[SEP])."""
        return self.max_seq_len - (3 if self.nsp else 2)

    @classmethod
    def from_config(cls, cfg) -> SampleSpec:
        return cls(
            max_seq_len=cfg.max_seq_len,
            nsp=cfg.nsp,
            short_seq_prob=cfg.short_seq_prob,
            mlm_probability=cfg.mlm_probability,
            mask_replace_prob=cfg.mask_replace_prob,
            random_replace_prob=cfg.random_replace_prob,
            whole_word_mask=cfg.whole_word_mask,
            max_predictions_per_seq=getattr(cfg, "max_predictions_per_seq", 0),
            pack_samples=getattr(cfg, "pack_samples", False),
        )

    def chunk_params(self) -> tuple:
        """The parameters that decide the chunking (hence the sample count) of an epoch."""
        return (self.max_num_tokens, round(self.short_seq_prob, 9)) + (("packed",) if self.pack_samples else ())

