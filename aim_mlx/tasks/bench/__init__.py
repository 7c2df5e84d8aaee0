"""Benchmark machinery for `aim-mlx bench` and the scripts in `benchmarks/`: not part of the runtime.

Nothing here is imported by the runtime modules, and importing this package imports none of its modules:
each caller takes what it needs, so torch and coremltools load only when their engine runs.

- `timing`: what is measured (timed calls, their summary, FLOPs, the sgemm roofline, peak memory) and on
  what machine (the facts and the header every result carries).
- `harness`: the configurations to measure and the child processes that measure them, one at a time
  (`run_isolated`) or side by side, timed in turns (`run_interleaved`).
- `mlx_engine`, `torch_engine`, `coreml_engine`: one engine each; `torch_engine` is the only module that
  imports torch and transformers, `coreml_engine` the only one that imports coremltools.
- `report`: the results as a table, the aim-mlx / torch ratios, a plot.
- `__main__`: a child process, `python -m aim_mlx.tasks.bench '<json spec>'`.
"""
