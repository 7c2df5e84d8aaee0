"""Classification figures from true and predicted class indices: the confusion matrix and per-class precision
and recall (what `aim-mlx train` reports on its validation split and `aim-mlx eval folder` on a test set)."""

import numpy as np


def confusion_matrix(truth, predicted, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(truth, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix


def per_class(matrix: np.ndarray, labels: list[str]) -> list[dict]:
    """Each class's precision and recall (percent; 0 where it has no predictions or no images) and support."""
    hits = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(100 * hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(100 * hits, support, out=np.zeros_like(hits), where=support > 0)
    return [
        {"label": label, "precision": float(p), "recall": float(r), "support": int(s)}
        for label, p, r, s in zip(labels, precision, recall, support, strict=True)
    ]


def top_k_accuracy(logits: np.ndarray, truth, k: int) -> float:
    """Percent of rows whose true class is among the k highest logits (ties: the lower index first)."""
    if len(logits) == 0:
        return 0.0
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(100 * (top == np.asarray(truth)[:, None]).any(axis=1).mean())
