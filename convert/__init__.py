"""Conversion tooling, installed as `aim_mlx.convert` (never as a bare `convert` module).

Writing converted MLX folders (with optional quantization) and exporting Core ML packages live here; the
runtime in aim_mlx/ loads what these tools write and never imports coremltools itself.
"""
