"""`aim-mlx bench` on tiny random checkpoints: table, JSON schema, plot, torch comparison, refusals."""

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aim_mlx.convert.convert import convert
from checkpoints import TINY, make_reference, write_checkpoint
from lit_checkpoints import TINY_VISION, make_lit_reference, write_lit_checkpoint
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.cli import app
from aim_mlx.errors import AimMlxError
from aim_mlx.loading import default_dtype
from aim_mlx.models.config import VisionConfig
from aim_mlx.tasks.bench.coreml_engine import coreml_row, run_coreml
from aim_mlx.tasks.bench.harness import group_by, run_interleaved
from aim_mlx.tasks.bench.report import check_plot_path, plot, table
from aim_mlx.tasks.bench.timing import device_name, flops_per_image, header, machine
from aim_mlx.tasks.bench.torch_engine import run_torch

runner = CliRunner()
ROW_KEYS = {
    "engine", "model", "dtype", "batch", "image_size", "images_per_s", "ms_per_image_p50", "ms_per_image_p95",
    "gflops", "flops_per_image", "times", "trials", "load_s", "peak_memory_mb", "peak_rss_mb", "peak_mlx_mb",
    "weights",
}  # fmt: skip
MACHINE_KEYS = {
    "cpu", "cores", "os", "python", "mlx", "numpy", "aim_mlx", "mlx_device", "gpu", "device_name", "mlx_blas",
    "mlx_blas_kernel", "numpy_blas_kernel", "openblas_coretype", "threads",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return write_checkpoint(make_reference(seed=11, image_size=56, **TINY["large"]), folder, "hf")


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native")
    return write_checkpoint(make_reference(seed=12, is_native=True, **TINY["large"]), folder, "apple")


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    """One full run: two batch sizes, the torch comparison (float32 against float32), JSON and a plot."""
    curve = tmp_path_factory.mktemp("plot") / "curve.png"
    args = ["bench", "-m", str(tiny), "--batch-sizes", "1,2", "--num-trials", "3", "--compare-torch"]
    args += ["--dtype", "float32"]
    result = runner.invoke(app, [*args, "--json", "--plot", str(curve)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), curve


def test_json_schema(report):
    data, _ = report
    assert data["machine"].keys() >= MACHINE_KEYS
    assert [(r["engine"], r["batch"]) for r in data["results"]] == [
        ("aim-mlx", 1), ("torch", 1), ("aim-mlx", 2), ("torch", 2),
    ]  # fmt: skip
    for row in data["results"]:
        assert row.keys() >= ROW_KEYS
        assert row["dtype"] == "float32" and row["image_size"] == 56 and len(row["times"]) == 3


def test_numbers_are_plausible(report):
    data, _ = report
    for r in data["results"]:
        assert r["images_per_s"] > 0 and r["gflops"] > 0 and r["load_s"] > 0 and r["peak_memory_mb"] > 0
        assert r["ms_per_image_p95"] >= r["ms_per_image_p50"] > 0
        # throughput, latency and batch size describe the same median call
        assert r["images_per_s"] * r["ms_per_image_p50"] / 1e3 == pytest.approx(1, rel=1e-6)
        assert r["gflops"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e9, rel=1e-6)
    expected = flops_per_image(VisionConfig(**TINY["large"], num_hidden_layers=2, image_size=56))
    assert data["results"][0]["flops_per_image"] == expected


def test_torch_ratio(report):
    data, _ = report
    rows = {(r["engine"], r["batch"]): r for r in data["results"]}
    assert [r["batch"] for r in data["torch_ratios"]] == [1, 2]
    for r in data["torch_ratios"]:
        ours, theirs = rows["aim-mlx", r["batch"]], rows["torch", r["batch"]]
        assert r["ratio"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])


def test_plot_is_written(report):
    _, curve = report
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_on_stdout(tiny):
    """In the default dtype (float16 on a GPU, float32 on a CPU, or AIM_MLX_DTYPE's)."""
    result = runner.invoke(app, ["bench", "-m", str(tiny), "--batch-sizes", "2", "--num-trials", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("# ") and "cores" in lines[0] and "BLAS" in lines[1]
    on = machine()
    if on["gpu"] is None:  # the CPU model, as on the first line
        assert f" on {on['cpu']} (CPU), BLAS" in lines[1] and lines[0].startswith(f"# {on['cpu']}, ")
    table = [line for line in lines if not line.startswith("# ")]  # a third comment if a kernel is forced
    assert table[0].split()[:6] == ["model", "engine", "dtype", "weights", "batch", "img/s"]
    assert table[1].split()[:5] == [tiny.name, "aim-mlx", default_dtype(), "float", "2"]


@pytest.mark.parametrize(
    "gpu, mlx_info, smi, expected",
    [
        ("cuda", {"device_name": "NVIDIA H200", "architecture": "sm_90"}, None, "NVIDIA H200"),
        ("cuda", {}, "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),  # an MLX without device_info
        ("cuda", {}, None, "an NVIDIA GPU"),  # nor nvidia-smi
        ("metal", {"device_name": "Apple M2 Pro", "architecture": "applegpu_g14s"}, None, "Apple M2 Pro"),
        ("metal", {}, "never asked", "an Apple GPU"),
        (None, {"device_name": "AMD EPYC"}, "never asked", "AMD EPYC 9654 96-Core Processor"),
    ],
)  # fmt: skip
def test_device_name(gpu, mlx_info, smi, expected):
    """The GPU's name from MLX (nvidia-smi where MLX gives none, on CUDA only), or the CPU model."""
    assert device_name(gpu, mlx_info, "AMD EPYC 9654 96-Core Processor", lambda: smi) == expected


def test_header_names_the_device():
    info = {
        "cpu": "AMD EPYC 9654 96-Core Processor", "cores": 16, "os": "Linux-6.8", "mlx": "0.32.4",
        "numpy": "2.4.6", "aim_mlx": "0.1.0", "mlx_device": "Device(gpu, 0)", "gpu": "cuda",
        "device_name": "NVIDIA H200", "mlx_blas": "MLX's own", "mlx_blas_kernel": None,
        "numpy_blas_kernel": None, "openblas_coretype": None, "threads": 16,
    }  # fmt: skip
    assert header(info).splitlines()[1].startswith("# mlx 0.32.4 on NVIDIA H200 (CUDA), BLAS MLX's own")
    metal = header({**info, "gpu": "metal", "device_name": "Apple M2 Pro"}).splitlines()[1]
    assert metal.startswith("# mlx 0.32.4 on Apple M2 Pro (Metal), ")
    cpu = {**info, "gpu": None, "device_name": info["cpu"], "mlx_device": "Device(cpu, 0)"}
    assert header(cpu).splitlines()[1].startswith("# mlx 0.32.4 on AMD EPYC 9654 96-Core Processor (CPU), ")
    older = {k: v for k, v in info.items() if k not in ("gpu", "device_name")}  # a result from before
    assert header(older).splitlines()[1].startswith("# mlx 0.32.4 on Device(gpu, 0), ")


def test_native_image_size(native):
    args = ["-m", str(native), "--batch-sizes", "1", "--num-trials", "1", "--image-size", "84", "--json"]
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert row["image_size"] == 84
    assert row["flops_per_image"] == flops_per_image(
        VisionConfig(**TINY["large"], num_hidden_layers=2), grid=(6, 6)
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-sizes", "0"], "--batch-sizes takes positive integers"),
        (["--batch-sizes", "1,x"], "--batch-sizes takes positive integers"),
        (["--image-size", "84"], "takes 56x56 images"),
        (["--plot", "curve.txt"], "--plot"),
        (["-q"], "group size 64 does not divide the 352 inputs"),
    ],
)
def test_refusals_are_one_line(tiny, args, message):
    result = runner.invoke(app, ["bench", "-m", str(tiny), "--num-trials", "1", *args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--dtype", "float8"], ["-q", "--q-bits", "3"]])
def test_unknown_dtype_or_bits_is_a_usage_error(tiny, args):
    result = runner.invoke(app, ["bench", "-m", str(tiny), *args])
    assert result.exit_code == 2 and args[-1] in result.output


def bench_json(*args) -> list[dict]:
    result = runner.invoke(app, ["bench", "--batch-sizes", "2", "--num-trials", "1", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["results"]


def test_quantized_in_memory_and_converted_folders(tmp_path):
    source = write_checkpoint(make_reference(seed=13, image_size=56, **TINY["huge"]), tmp_path / "src", "hf")
    convert(str(source), tmp_path / "q8", quantize=True, q_bits=8)
    [float_row, q4_row] = bench_json("-m", str(source)) + bench_json("-m", str(source), "-q")
    [converted] = bench_json("-m", str(tmp_path / "q8"))
    assert (float_row["weights"], q4_row["weights"], converted["weights"]) == ("float", "q4", "q8")
    assert q4_row["bits"] == 4 and q4_row["images_per_s"] > 0
    assert q4_row["flops_per_image"] == float_row["flops_per_image"] == converted["flops_per_image"]
    result = runner.invoke(app, ["bench", "-m", str(tmp_path / "q8"), "--num-trials", "1", "--compare-torch"])
    assert result.exit_code == 1 and "a quantized folder" in result.stderr


def test_lit_checkpoint_benchmarks_its_image_tower(tmp_path):
    folder = write_lit_checkpoint(make_lit_reference(seed=3), tmp_path / "lit")
    [row] = bench_json("-m", str(folder))
    vision = VisionConfig(**TINY_VISION, image_size=56)
    assert row["images_per_s"] > 0 and row["flops_per_image"] == flops_per_image(vision)
    result = runner.invoke(app, ["bench", "-m", str(folder), "--num-trials", "1", "--compare-torch"])
    assert result.exit_code == 1 and "a LiT checkpoint" in result.stderr


def test_coreml_rows_fit_the_table_and_plot(tmp_path):
    """The rows `--coreml` makes on macOS (timings here are made up: only the shape is checked)."""
    rows = [coreml_row(tmp_path / "m.mlpackage", unit, [0.02, 0.03], 0.5, "int8") for unit in ("ALL",)]
    assert rows[0].keys() >= ROW_KEYS - {"image_size", "flops_per_image", "times"}
    assert rows[0]["gflops"] is None and rows[0]["ms_per_image_p95"] >= rows[0]["ms_per_image_p50"]
    line = table(rows).splitlines()[1].split()
    assert line[:6] == ["m.mlpackage", "coreml", "ALL", "package", "int8", "1"] and line[9] == "-"
    json.dumps(rows, allow_nan=False)  # machine-readable: no NaN
    plot(rows, tmp_path / "curve.png")


def test_a_failed_plot_leaves_the_old_file_and_no_other(monkeypatch, tmp_path):
    """The plot is written beside its path and renamed into place: a failure halfway leaves nothing."""
    from matplotlib.figure import Figure

    def fail(self, path, **kwargs):
        Path(path).write_bytes(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    (tmp_path / "curve.png").write_bytes(b"the last plot")
    rows = [coreml_row(tmp_path / "m.mlpackage", "ALL", [0.02, 0.03], 0.5, "int8")]
    with pytest.raises(OSError, match="disk full"):
        plot(rows, tmp_path / "curve.png")
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]
    assert (tmp_path / "curve.png").read_bytes() == b"the last plot"


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs there; this checks the refusal elsewhere")
def test_coreml_refused_off_macos(tmp_path):
    result = runner.invoke(app, ["bench", "--coreml", str(tmp_path / "model.mlpackage")])
    assert result.exit_code == 1 and "needs macOS" in result.stderr


def test_plot_without_matplotlib_is_refused_before_any_benchmark(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is absent
    with pytest.raises(AimMlxError) as info:
        check_plot_path(tmp_path / "curve.png")
    assert str(info.value) == "matplotlib is not installed; pip install 'aim-mlx[plot]'"
    # a model that does not exist: had a benchmark run first, its error would be the one printed
    args = ["bench", "-m", str(tmp_path / "missing"), "--plot", str(tmp_path / "curve.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.stderr == f"error: {info.value}\n"


@pytest.mark.parametrize("missing", ["torch", "transformers"])
def test_compare_torch_without_torch_names_the_bench_extra(monkeypatch, tiny, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    spec = {"engine": "torch", "model": str(tiny), "batch": 1, "image_size": None, "trials": 1, "warmup": 0}
    with pytest.raises(AimMlxError) as info:
        run_torch(spec)
    assert str(info.value) == f"{missing} is not installed; pip install 'aim-mlx[bench]'"


def test_coreml_without_coremltools_names_the_coreml_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "darwin")  # past the macOS check, to the import
    monkeypatch.setitem(sys.modules, "coremltools", None)
    (tmp_path / "m.mlpackage").mkdir()
    with pytest.raises(AimMlxError) as info:
        run_coreml(tmp_path / "m.mlpackage")
    assert str(info.value) == "coremltools is not installed; pip install 'aim-mlx[coreml]'"


def test_interleaved_runs_take_turns_and_report_each_engine(tiny):
    specs = [
        {"engine": engine, "model": str(tiny), "dtype": "float32", "batch": 2, "image_size": None}
        for engine in ("aim-mlx", "torch")
    ]
    specs = [{**spec, "trials": 3, "warmup": 0} for spec in specs]
    turns = []  # wall-clock time of each turn's start
    rows = run_interleaved(specs, between=lambda: turns.append(time.time()))
    assert len(turns) == 3
    for i, turn in enumerate(turns):  # both engines' call i falls in turn i, in A B / B A order
        first, second = (rows[0], rows[1]) if i % 2 == 0 else (rows[1], rows[0])
        end = turns[i + 1] if i + 1 < len(turns) else float("inf")
        assert turn < first["started"][i] < second["started"][i] < end
    assert [(r["engine"], r["paced"], len(r["times"])) for r in rows] == [
        ("aim-mlx", True, 3),
        ("torch", True, 3),
    ]
    assert all(r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)


def test_interleaved_failure_is_the_childs_one_line_error(tiny, tmp_path):
    specs = [
        {"engine": "aim-mlx", "model": str(path), "dtype": "float32", "batch": 1, "image_size": None}
        for path in (tiny, tmp_path / "missing")
    ]
    with pytest.raises(AimMlxError, match="missing") as info:
        run_interleaved([{**spec, "trials": 1, "warmup": 0} for spec in specs])
    assert "\n" not in str(info.value)


def test_group_by_keeps_first_appearance_order():
    specs = [{"model": m, "batch": b, "engine": e} for b in (1, 8) for m in "ab" for e in ("x", "y")]
    groups = group_by(specs, ("model", "batch"))
    assert [[s["engine"] for s in g] for g in groups] == [["x", "y"]] * 4
    assert [(g[0]["model"], g[0]["batch"]) for g in groups] == [("a", 1), ("b", 1), ("a", 8), ("b", 8)]


AIM_MLX = Path(aim_mlx.__file__).parent
OPTIONAL = ("torch", "transformers", "coremltools")


def imports(path: Path) -> set[str]:
    """Every module a source file imports, at any depth, relative imports spelled out from `aim_mlx`."""
    package = ["aim_mlx", *path.parent.relative_to(AIM_MLX).parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def test_torch_and_coreml_are_imported_only_by_the_benchmark_package():
    """torch, transformers and coremltools stay out of aim_mlx outside aim_mlx/tasks/bench; the runtime does
    not import the benchmark package (the CLI may)."""
    for path in AIM_MLX.rglob("*.py"):
        part = path.relative_to(AIM_MLX).parts[0]
        if path.relative_to(AIM_MLX).parts[:2] == ("tasks", "bench"):
            continue
        names = imports(path)
        assert not {n for n in names if n.split(".")[0] in OPTIONAL}, path
        if part != "cli":
            assert not {n for n in names if n.startswith("aim_mlx.tasks.bench")}, path


def test_importing_the_benchmark_imports_neither_torch_nor_coremltools():
    """Only a torch configuration loads torch (in its own child process); the rest of the package, and the
    CLI that imports it, load neither torch nor coremltools."""
    names = ("harness", "timing", "report", "mlx_engine", "coreml_engine", "__main__")
    modules = ["aim_mlx.cli", *(f"aim_mlx.tasks.bench.{m}" for m in names)]
    code = f"import sys; {'; '.join(f'import {m}' for m in modules)}; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not [name for name in OPTIONAL if f"'{name}'" in loaded]
