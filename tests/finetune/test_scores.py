"""Task metrics against independent references (scipy) and hand-computed values."""

import numpy as np
import pytest
import scipy.stats

from ptft_dist.finetune.scores import classification_metrics, confusion_matrix, matthews_corrcoef, regression_metrics


def test_binary_metrics_by_hand():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    preds = np.array([1, 1, 0, 0, 0, 1, 0, 1])
    logits = np.eye(2)[preds]
    m = classification_metrics(labels, logits)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # tp=3 fn=1 fp=1 tn=3: F1 of each class 0.75
    assert m["macro_f1"] == pytest.approx(0.75)
    assert m["mcc"] == pytest.approx((3 * 3 - 1 * 1) / np.sqrt(4 * 4 * 4 * 4))


def test_mcc_extremes_and_multiclass():
    y = np.array([0, 1, 2, 0, 1, 2])
    assert matthews_corrcoef(confusion_matrix(y, y, 3)) == pytest.approx(1.0)
    assert matthews_corrcoef(confusion_matrix(y, np.zeros_like(y), 3)) == 0.0
    assert matthews_corrcoef(confusion_matrix(y, (y + 1) % 3, 3)) < 0


def test_regression_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=200)
    b = a + rng.normal(scale=0.5, size=200)
    b[:20] = np.round(b[:20])  # ties
    m = regression_metrics(a, b)
    assert m["pearson"] == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-12)
    assert m["spearman"] == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-12)
