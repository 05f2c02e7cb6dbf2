"""Synthetic English-like documents for prepare tests: varied, deterministic, sentence-shaped."""

from __future__ import annotations

import random

_SUBJECTS = ["The committee", "A young engineer", "The old river", "Our neighbour", "The council", "A small bird",
             "The research team", "My grandmother", "The city museum", "A local farmer", "The orchestra",
             "The new library", "An honest merchant", "The school board", "A quiet student", "The harbour master"]
_VERBS = ["announced", "discovered", "painted", "questioned", "celebrated", "rebuilt", "described", "measured",
          "remembered", "carried", "studied", "welcomed", "photographed", "examined", "organised", "repaired"]
_OBJECTS = ["the bridge near the station", "a forgotten letter", "the winter harvest", "an unusual comet",
            "the morning newspaper", "several ancient maps", "the broken clock tower", "a basket of apples",
            "the annual budget", "a hidden garden", "the mountain road", "a curious machine",
            "the evening concert", "a stack of reports", "the village well", "a silver compass"]
_TAILS = ["before the storm arrived", "after a long discussion", "with remarkable patience", "during the festival",
          "without any help", "for the third time this year", "in front of a large crowd", "at dawn",
          "despite the heavy rain", "to everyone's surprise", "as the bells rang", "under a clear sky"]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
    if rng.random() < 0.3:
        s += f", and {rng.choice(_SUBJECTS).lower()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return s + rng.choice([".", ".", ".", "!", "?"])


def document(rng: random.Random, n_sentences: int | None = None) -> str:
    n = n_sentences or rng.randint(4, 14)
    sents = [sentence(rng) for _ in range(n)]
    paras, i = [], 0
    while i < len(sents):
        k = rng.randint(2, 5)
        paras.append(" ".join(sents[i : i + k]))
        i += k
    return "\n\n".join(paras)


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n)]
