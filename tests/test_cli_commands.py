"""One output rule for every command that writes, and the flags of convert, bench and export as they reach
the library (the library functions replaced by recorders where running them is not the point)."""

from types import SimpleNamespace

import pytest
from aim_mlx.convert import convert as conversion
from typer.testing import CliRunner

from aim_mlx.cli import app
from aim_mlx.tasks.bench import coreml_engine, harness

runner = CliRunner()

# Each command that writes, with the output it would write; the model does not exist, so a command that
# got past its output check would fail on the model instead.
WRITERS = {
    "embed": (["embed", "{tmp}/photo.jpg", "-m", "{tmp}/no-model", "-o"], "e.npy", "file"),
    "convert": (["convert", "--hf-path", "{tmp}/no-model", "--mlx-path"], "converted", "folder"),
    "export": (["export", "coreml", "-m", "{tmp}/no-model", "-o"], "m.mlpackage", "folder"),
    "bench": (["bench", "-m", "{tmp}/no-model", "--plot"], "curve.png", "file"),
}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def writer(tmp_path, command: str, output, *extra):
    args, _, _ = WRITERS[command]
    (tmp_path / "photo.jpg").write_bytes(b"")
    return invoke(*[a.format(tmp=tmp_path) for a in args], output, *extra)


def error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("command", WRITERS)
def test_an_existing_output_is_replaced_only_with_force(tmp_path, command):
    _, name, kind = WRITERS[command]
    out = tmp_path / name
    out.mkdir() if kind == "folder" else out.write_bytes(b"keep")
    line = error_line(writer(tmp_path, command, out))
    assert line == f"error: {out} already exists; pass --force to replace it" and out.exists()
    assert "no-model" in error_line(writer(tmp_path, command, out, "--force"))  # past the check: the model


@pytest.mark.parametrize("command", WRITERS)
def test_an_output_in_a_missing_folder_is_refused(tmp_path, command):
    _, name, _ = WRITERS[command]
    out = tmp_path / "not-made" / name
    line = error_line(writer(tmp_path, command, out))
    assert line == f"error: folder {tmp_path / 'not-made'} does not exist; create it first"
    assert not (tmp_path / "not-made").exists()


@pytest.fixture
def conversions(monkeypatch):
    """convert() replaced by a recorder of its keyword arguments."""
    calls = []

    def record(hf_path, mlx_path, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(
            source=hf_path, revision=None, dtype="float32", quantized={}, bytes_before=0, bytes_after=0,
            output=mlx_path, files=["model.safetensors"],
        )  # fmt: skip

    monkeypatch.setattr(conversion, "convert", record)
    return calls


def test_convert_passes_none_for_the_quantization_options_not_given(conversions, tmp_path):
    out = str(tmp_path / "out")
    assert invoke("convert", "--hf-path", "x", "--mlx-path", out, "-q").exit_code == 0
    given = ["-q", "--q-bits", "8", "--q-group-size", "32", "--quant-predicate", "mixed_4_8"]
    assert invoke("convert", "--hf-path", "x", "--mlx-path", out, *given).exit_code == 0
    first, second = conversions
    assert first["quantize"] is True
    assert (first["q_bits"], first["q_group_size"], first["quant_predicate"]) == (None, None, None)
    assert (second["q_bits"], second["q_group_size"], second["quant_predicate"]) == (8, 32, "mixed_4_8")


def test_convert_refuses_quantization_options_without_q(tmp_path):
    result = invoke(
        "convert", "--hf-path", tmp_path / "no-model", "--mlx-path", tmp_path / "o", "--q-bits", 8
    )
    assert "-q" in error_line(result)


@pytest.fixture
def bench_bits(monkeypatch):
    """The `bits` harness.configurations is given (and no configuration to run)."""
    seen = []

    def configurations(models, dtypes, sizes, image_size, trials, warmup, compare_torch, bits=None):
        seen.append(bits)
        return []

    monkeypatch.setattr(harness, "configurations", configurations)
    return seen


@pytest.mark.parametrize("args, bits", [([], None), (["-q"], 4), (["-q", "--q-bits", "8"], 8)])
def test_bench_q_is_a_flag_as_in_convert(bench_bits, args, bits):
    assert invoke("bench", *args).exit_code == 0
    assert bench_bits == [bits]


def test_bench_q_bits_without_q_is_refused(bench_bits):
    line = error_line(invoke("bench", "--q-bits", "8"))
    assert line == "error: --q-bits 8 only applies when quantizing; add -q"
    assert bench_bits == []


def test_bench_plot_says_where_it_wrote(monkeypatch, tmp_path):
    row = coreml_engine.coreml_row(tmp_path / "m.mlpackage", "ALL", [0.02, 0.03], 0.5, "none")
    spec = {"model": "m", "batch": 1, "engine": "aim-mlx", "dtype": "float32"}
    monkeypatch.setattr(harness, "configurations", lambda *args: [spec])
    monkeypatch.setattr(harness, "run_isolated", lambda spec: row)
    plot = tmp_path / "curve.png"
    result = invoke("bench", "--plot", plot, "--json")
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert result.stderr.splitlines()[-1] == f"wrote the plot to {plot}"
