"""Results for people: the aligned table, the aim-mlx / torch ratios, a plot of images/s by batch size."""

from pathlib import Path

from ...errors import ConfigError
from ...extras import require
from ...files import save_figure


def torch_ratios(rows: list[dict]) -> list[dict]:
    """aim-mlx / torch images/s per model and batch size, for the float32 aim-mlx runs."""
    torch_speed = {(r["model"], r["batch"]): r["images_per_s"] for r in rows if r["engine"] == "torch"}
    return [
        {
            "model": r["model"],
            "batch": r["batch"],
            "weights": r["weights"],
            "ratio": r["images_per_s"] / torch_speed[r["model"], r["batch"]],
        }
        for r in rows
        if r["engine"] == "aim-mlx" and r["dtype"] == "float32" and (r["model"], r["batch"]) in torch_speed
    ]


def table(rows: list[dict]) -> str:
    """The results as an aligned text table."""
    head = (
        "model",
        "engine",
        "dtype",
        "weights",
        "batch",
        "img/s",
        "ms/img p50",
        "p95",
        "GFLOP/s",
        "peak MB",
        "load s",
    )
    body = [
        (
            Path(r["model"]).name,
            r["engine"],
            r["dtype"],
            r["weights"],
            str(r["batch"]),
            f"{r['images_per_s']:.3f}",
            f"{r['ms_per_image_p50']:.1f}",
            f"{r['ms_per_image_p95']:.1f}",
            "-" if r["gflops"] is None else f"{r['gflops']:.1f}",
            f"{r['peak_memory_mb']:.0f}",
            f"{r['load_s']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (head, *body)
    )


def check_plot_path(path: Path) -> None:
    """Refuse a `--plot` that cannot be drawn (a format matplotlib guesses wrong, no matplotlib) before any
    benchmark runs, rather than after minutes of measuring."""
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot {path}: use a .png, .svg or .pdf file name")
    require("matplotlib")


def plot(rows: list[dict], path: Path) -> None:
    """images/s against batch size, one line per (model, engine, dtype, weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault((Path(r["model"]).name, r["engine"], r["dtype"], r["weights"]), []).append(r)
    for (model, engine, dtype, weights), points in lines.items():
        points.sort(key=lambda r: r["batch"])
        ax.plot(
            [r["batch"] for r in points],
            [r["images_per_s"] for r in points],
            marker="o",
            label=f"{model} {engine} {dtype}" + ("" if weights == "float" else f" {weights}"),
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
