"""The demo's learning checks (ptft_dist/demo/run.py) fail for a model that learned nothing: a
majority-class predictor and a random guesser on a Rotten-Tomatoes-sized balanced test set, scored by
the real metric code (finetune/scores.py), are refused; a model with a modest real signal passes."""

from __future__ import annotations

import numpy as np

from ptft_dist.demo.run import MIN_LEARNING_Z, Stage, check_learning, learning_z
from ptft_dist.finetune.scores import classification_metrics

N_TEST = 1056


def _labels(rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.r_[np.zeros(532, dtype=int), np.ones(N_TEST - 532, dtype=int)])  # majority 0.504


def _stages(test_metrics: dict) -> list[Stage]:
    m = {"test_accuracy": test_metrics["accuracy"], "test_macro_f1": test_metrics["macro_f1"],
         "test_mcc": test_metrics["mcc"], "learning_z": learning_z(test_metrics, N_TEST), "validation_accuracy": 0.0}
    return [Stage("finetune-full", 1.0, dict(m)), Stage("finetune-lora", 1.0, dict(m))]


def _logits(preds: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - preds, preds.astype(float)], axis=1)


def test_majority_class_predictor_is_refused_though_it_beats_half():
    labels = _labels(np.random.default_rng(0))
    metrics = classification_metrics(labels, _logits(np.zeros(N_TEST, dtype=int)))
    assert metrics["accuracy"] > 0.5  # what the old check (accuracy > 0.5) let through
    problems = check_learning(_stages(metrics), quick=True)
    assert len(problems) == 2 and all("learned nothing" in p for p in problems)


def test_random_guessers_are_refused_at_the_chosen_error_rate():
    rng = np.random.default_rng(1)
    labels = _labels(rng)
    passed = 0
    for _ in range(300):  # predictions independent of the labels: z ~ N(0, 1), P(z >= 3) ~ 0.001
        metrics = classification_metrics(labels, _logits(rng.integers(0, 2, N_TEST)))
        passed += learning_z(metrics, N_TEST) >= MIN_LEARNING_Z
    assert passed <= 2


def test_a_model_with_a_modest_signal_passes():
    rng = np.random.default_rng(2)
    labels = _labels(rng)
    preds = np.where(rng.random(N_TEST) < 0.62, labels, 1 - labels)  # 62 % right, no class bias
    metrics = classification_metrics(labels, _logits(preds))
    assert check_learning(_stages(metrics), quick=True) == []
    assert learning_z(metrics, N_TEST) > 5
