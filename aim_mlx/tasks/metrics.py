"""Classification figures from true and predicted class indices: the confusion matrix and per-class precision
and recall (what `aim-mlx train` reports on its validation split and `aim-mlx eval folder` on a test set),
and the matrix as an image (the `plot` extra)."""

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..extras import require
from ..files import save_figure


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


def check_plot(path: Path) -> Path:
    """Refuse a `--plot` that cannot be drawn (a format matplotlib would guess wrong, no matplotlib: the
    `plot` extra) before any work."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {path}: use a .png, .svg or .pdf file name")
    require("matplotlib", "plot")
    return path


def plot_confusion(matrix, labels: list[str], path: Path, title: str = "") -> None:
    """The confusion matrix as an image: rows true classes, columns predicted, each cell its count, shaded
    by its share of the row (the class's recall on the diagonal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.4 * len(labels), 30)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 40:  # beyond that the numbers do not fit their cells
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(
                j, i, str(count), ha="center", va="center", color="white" if rows[i, j] > 0.5 else "black"
            )
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
