"""Temporary: what `aim-mlx bench` (aim_mlx/cli.py) and tests/test_blas.py still import from here, now in
aim_mlx/benchmark/. Delete once the CLI imports the package itself."""

from .benchmark.coreml_engine import run_coreml
from .benchmark.harness import configurations, group_by, parse_batch_sizes, run_interleaved, run_isolated
from .benchmark.report import check_plot_path, plot, table, torch_ratios
from .benchmark.timing import header, machine

__all__ = [
    "check_plot_path",
    "configurations",
    "group_by",
    "header",
    "machine",
    "parse_batch_sizes",
    "plot",
    "run_coreml",
    "run_interleaved",
    "run_isolated",
    "table",
    "torch_ratios",
]
