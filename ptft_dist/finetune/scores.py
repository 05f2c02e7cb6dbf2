"""Task metrics: accuracy, macro F1, MCC for classification; Pearson and Spearman for regression.

Small numpy implementations (GLUE's definitions) so evaluation needs no hub download.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), preds.astype(np.int64)), 1)
    return cm


def macro_f1(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(np.float64)
    precision_den = cm.sum(axis=0)
    recall_den = cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(precision_den + recall_den > 0, 2 * tp / (precision_den + recall_den), 0.0)
    present = (precision_den + recall_den) > 0
    return float(f1[present].mean()) if present.any() else 0.0


def matthews_corrcoef(cm: np.ndarray) -> float:
    """Multi-class MCC (Gorodkin 2004), equal to the binary formula for two classes."""
    t = cm.sum(axis=1).astype(np.float64)
    p = cm.sum(axis=0).astype(np.float64)
    c = float(np.trace(cm))
    s = float(cm.sum())
    num = c * s - float(t @ p)
    den = np.sqrt((s * s - float(p @ p)) * (s * s - float(t @ t)))
    return float(num / den) if den > 0 else 0.0


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_rank(np.asarray(a)), _rank(np.asarray(b)))


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    preds = logits.argmax(axis=-1)
    cm = confusion_matrix(labels, preds, logits.shape[-1])
    return {
        "accuracy": float((preds == labels).mean()) if len(labels) else 0.0,
        "macro_f1": macro_f1(cm),
        "mcc": matthews_corrcoef(cm),
    }


def regression_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    preds = preds.reshape(-1)
    return {
        "pearson": pearson(labels, preds),
        "spearman": spearman(labels, preds),
        "mse": float(np.mean((labels - preds) ** 2)) if len(labels) else 0.0,
    }
