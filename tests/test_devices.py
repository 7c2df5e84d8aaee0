"""Device choice (platform/devices.py): the decision on fake facts, the facts read here, the wiring."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from emulation import APPLE
from typer.testing import CliRunner

from aim_mlx.cli import app
from aim_mlx.errors import ConfigError
from aim_mlx.platform import devices
from aim_mlx.platform.devices import Facts, choose, visible_gpus

CUDA = Facts(
    "linux", "x86_64", "cuda", "mlx-cuda-12", cuda_driver=True, cuda_gpus=1
)  # an NVIDIA machine with MLX's CUDA build
CPU = Facts("linux", "x86_64", "cpu", "mlx-cpu")  # MLX's CPU build (this project's test machines)
MAC = Facts("darwin", "arm64", "metal", "mlx-metal")


def test_cuda_gpu():
    c = choose(CUDA)
    assert (c.device, c.gpu, c.dtype, c.fast_blas, c.numpy_backend) == (
        "gpu",
        "cuda",
        "float16",
        False,
        False,
    )
    assert not c.set_default and not c.notes  # MLX picks its GPU by itself


def test_cuda_build_without_a_gpu_runs_on_the_cpu():
    """MLX's CUDA build defaults to a GPU it cannot use: the CPU is set, with the CPU's helpers, and said."""
    c = choose(CUDA._replace(cuda_gpus=0))
    assert (c.device, c.gpu, c.dtype, c.fast_blas, c.numpy_backend) == ("cpu", None, "float32", True, True)
    assert c.set_default
    assert c.notes == (
        "MLX's CUDA build is installed, but the NVIDIA driver reports no GPU (see nvidia-smi, and "
        "CUDA_VISIBLE_DEVICES if it is set); MLX runs on the CPU",
    )


def test_cuda_build_without_the_driver_cannot_load():
    """Measured with mlx[cuda12]==0.32.4 on a machine without the driver: `import mlx.core` raises
    ImportError (libcuda.so.1), with no fallback. apply() says so in one line before MLX is imported, and how
    to fix it."""
    with pytest.raises(ConfigError) as error:
        choose(CUDA._replace(cuda_driver=False, cuda_gpus=0, version="0.32.4"))
    assert str(error.value) == (
        "MLX's CUDA build (mlx-cuda-12) cannot load: the NVIDIA driver's libcuda.so.1 is not found. For the "
        "CPU, put MLX's CPU build in its place: pip uninstall -y mlx-cuda-12 && pip install "
        "--force-reinstall --no-deps mlx-cpu==0.32.4"
    )


@pytest.mark.parametrize("setting", ["cpu", " CPU "])
def test_cpu_asked_for_on_a_gpu_machine(setting):
    c = choose(CUDA._replace(device=setting))
    assert (c.device, c.gpu, c.dtype, c.fast_blas, c.numpy_backend) == ("cpu", None, "float32", True, True)
    assert c.set_default and not c.notes
    mac = choose(MAC._replace(device=setting))
    assert (mac.device, mac.dtype, mac.fast_blas, mac.numpy_backend, mac.set_default) == (
        "cpu", "float32", False, False, True,
    )  # fmt: skip


def test_gpu_asked_for_where_there_is_one():
    for facts in (CUDA, MAC):
        c = choose(facts._replace(device="gpu"))
        assert c.device == "gpu" and c.dtype == "float16" and not c.set_default


NO_GPU = [
    (CPU, 'the MLX installed here is its CPU build; for an NVIDIA GPU: pip install "aim-mlx[cuda]"'),
    (
        CUDA._replace(cuda_gpus=0),
        "the NVIDIA driver reports no GPU (see nvidia-smi, and CUDA_VISIBLE_DEVICES if it is set)",
    ),
    (Facts("darwin", "x86_64", None), "MLX has no GPU backend on an Intel Mac"),
]


@pytest.mark.parametrize("facts, why", NO_GPU)
def test_gpu_asked_for_where_there_is_none(facts, why):
    with pytest.raises(ConfigError) as error:
        choose(facts._replace(device="gpu"))
    assert str(error.value) == f"AIM_MLX_DEVICE=gpu, but {why}"


@pytest.mark.parametrize("facts", [CPU, CUDA, MAC])
def test_mistyped_device(facts):
    with pytest.raises(ConfigError) as error:
        choose(facts._replace(device="cuda"))
    assert str(error.value) == "AIM_MLX_DEVICE='cuda' is not a device; use cpu or gpu"


def test_macos():
    c = choose(MAC)
    assert (c.device, c.gpu, c.dtype, c.fast_blas, c.numpy_backend) == (
        "gpu",
        "metal",
        "float16",
        False,
        False,
    )
    assert not c.set_default
    # An MLX wheel from before the mlx-metal split carries Metal itself; an Intel Mac has no MLX GPU.
    assert choose(MAC._replace(build=None, package=None)).gpu == "metal"
    intel = choose(Facts("darwin", "x86_64", None))
    assert (intel.device, intel.dtype, intel.fast_blas, intel.set_default) == ("cpu", "float32", False, False)


def test_linux_cpu_build():
    c = choose(CPU)
    assert (c.device, c.gpu, c.dtype, c.fast_blas, c.numpy_backend) == ("cpu", None, "float32", True, True)
    assert not c.set_default and not c.notes
    arm = choose(CPU._replace(machine="aarch64"))
    assert arm.device == "cpu" and arm.fast_blas


@pytest.mark.parametrize("facts", [CPU, CUDA, MAC, CUDA._replace(device="cpu")])
def test_aim_mlx_dtype_wins(facts):
    for setting, dtype in [("bfloat16", "bfloat16"), (" Float32 ", "float32"), ("", choose(facts).dtype)]:
        assert choose(facts._replace(dtype=setting)).dtype == dtype
    with pytest.raises(
        ConfigError, match=r"^AIM_MLX_DTYPE='fp16' is not a dtype; use float32, float16, bfloat16$"
    ):
        choose(facts._replace(dtype="fp16"))


def test_both_mlx_builds_installed():
    """`aim-mlx[cuda]` installs mlx-cpu and mlx-cuda-12, which both install mlx/lib/libmlx.so: the one in
    place decides. The CUDA one is what the extra is for (nothing said); the CPU one is said, with both ways
    out."""
    cuda = choose(CUDA._replace(others=("mlx-cpu",), version="0.32.4"))
    assert cuda.device == "gpu" and not cuda.notes
    cpu = choose(CPU._replace(others=("mlx-cuda-12",), version="0.32.4"))
    assert cpu.device == "cpu" and cpu.notes == (
        "mlx-cuda-12 is installed, but mlx-cpu's libmlx.so (the same file) is in place, so MLX runs on the "
        "CPU. For the GPU: pip install --force-reinstall --no-deps mlx-cuda-12==0.32.4; to keep the CPU: pip "
        "uninstall -y mlx-cuda-12 && pip install --force-reinstall --no-deps mlx-cpu==0.32.4",
    )


@pytest.mark.parametrize(
    "setting, count, visible",
    [
        (None, 2, 2), ("", 2, 0), ("-1", 2, 0), ("0", 2, 1), ("1,0", 2, 2), ("0,5,1", 4, 1), ("2", 2, 0),
        ("GPU-8f6e2c1a", 1, 1), ("MIG-1234,0", 1, 1), (" 0 , 1 ", 2, 2), ("0", 0, 0),
    ],
)  # fmt: skip
def test_visible_gpus(setting, count, visible):
    """CUDA reads CUDA_VISIBLE_DEVICES up to its first invalid entry."""
    assert visible_gpus(count, setting) == visible


def test_facts_read_on_this_machine(monkeypatch):
    """What is read here agrees with what MLX itself says, without asking for a GPU on a CPU build."""
    monkeypatch.delenv("AIM_MLX_DEVICE", raising=False)
    facts = devices.read_facts()
    assert facts.platform == sys.platform and facts.device == ""
    if facts.build != "cuda":
        assert facts.cuda_gpus == 0 and not facts.cuda_driver
    choice = devices.choose(facts)
    assert (mx.default_device() == mx.gpu) == (choice.device == "gpu")


def test_apply_sets_mlx_default_where_it_differs(monkeypatch):
    """Only where the choice differs from MLX's own default (a CUDA build without a usable GPU, or
    AIM_MLX_DEVICE); otherwise a caller's own mx.set_default_device stands."""
    calls = []
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # as MLX's CUDA build starts out
    monkeypatch.setattr(mx, "set_default_device", calls.append)
    monkeypatch.setattr(devices, "read_facts", lambda: CUDA._replace(cuda_gpus=0))
    assert devices.apply().device == "cpu" and calls == [mx.cpu]
    monkeypatch.setattr(devices, "read_facts", lambda: CUDA)
    assert devices.apply().device == "gpu" and calls == [mx.cpu]  # nothing to set
    monkeypatch.setattr(devices, "read_facts", lambda: CUDA._replace(device="cpu"))
    assert devices.apply().device == "cpu" and calls == [mx.cpu, mx.cpu]


def test_a_gpu_asked_for_here_is_a_one_line_cli_error(tmp_path, monkeypatch):
    if devices.current().device == "gpu":
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("AIM_MLX_DEVICE", "gpu")
    result = CliRunner().invoke(app, ["bench", "-m", str(tmp_path), "--batch-sizes", "1"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: AIM_MLX_DEVICE=gpu, but ")


def test_every_command_checks_the_device_setting_first(monkeypatch):
    """Before a command imports mlx.core (which raises an ImportError with MLX's CUDA build and no driver):
    one line, even from commands that load no model."""
    monkeypatch.setattr(devices, "read_facts", lambda: CUDA._replace(cuda_driver=False, cuda_gpus=0))
    for args in (["models"], ["embed", "photo.jpg"], ["search", "a cat"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, args
        assert result.output.strip().splitlines()[-1].startswith("error: MLX's CUDA build"), result.output


def _import_aim_mlx(env: dict, extra_path: str | None = None) -> subprocess.CompletedProcess:
    script = (
        "import aim_mlx, json; from aim_mlx.platform import blas; from aim_mlx.platform import devices\n"
        "print(json.dumps([blas.loaded(), devices.read_facts().build, devices.read_facts().others]))"
    )
    env = {**os.environ, **env}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)


@pytest.mark.skipif(sys.platform != "linux" or APPLE, reason="the BLAS swap acts on Linux only")
def test_import_loads_the_fast_blas_for_the_cpu_only():
    """AIM_MLX_DEVICE=cpu: the swap; a mistyped value fails no import (load() says so), and skips it."""
    assert _import_aim_mlx({"AIM_MLX_DEVICE": "cpu"}).stdout.split("\n")[0].startswith("[true")
    done = _import_aim_mlx({"AIM_MLX_DEVICE": "tpu"})
    assert done.stdout.startswith("[false")


def _site(folder, lib_size: int | None, **records) -> Path:
    """A fake site-packages: the `mlx` package, its libmlx.so (`lib_size` bytes), and a dist-info per backend
    distribution, named as the wheels name them, whose RECORD gives the size of the libmlx.so it installs."""
    (folder / "mlx" / "lib").mkdir(parents=True)
    if lib_size is not None:
        (folder / "mlx" / "lib" / "libmlx.so").write_bytes(b"\0" * lib_size)
    for name, size in records.items():
        info = folder / f"{name}-0.32.4.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.32.4\n"
        )
        (info / "RECORD").write_text(
            f"mlx/include/mlx/array.h,sha256=x,17699\nmlx/lib/libmlx.so,sha256=x,{size}\n"
        )
    return folder


@pytest.mark.parametrize(
    "lib_size, records, expected",
    [
        (21, {"mlx_cpu": 21}, ("cpu", "mlx-cpu", "0.32.4", ())),
        (125, {"mlx_cuda_12": 125}, ("cuda", "mlx-cuda-12", "0.32.4", ())),
        (125, {"mlx_cuda": 125}, ("cuda", "mlx-cuda", "0.32.4", ())),  # MLX 0.29-0.30's name
        (125, {"mlx_cpu": 21, "mlx_cuda_12": 125}, ("cuda", "mlx-cuda-12", "0.32.4", ("mlx-cpu",))),
        (21, {"mlx_cpu": 21, "mlx_cuda_12": 125}, ("cpu", "mlx-cpu", "0.32.4", ("mlx-cuda-12",))),
        (None, {"mlx_cpu": 21}, ("cpu", "mlx-cpu", "0.32.4", ())),
        (21, {}, (None, None, None, ())),
    ],
)  # fmt: skip
def test_find_build(tmp_path, lib_size, records, expected):
    """Both wheels install mlx/lib/libmlx.so, so where both are installed the file's size says whose it is."""
    assert (
        devices.find_build([tmp_path / "nothing", _site(tmp_path / "site", lib_size, **records)]) == expected
    )


@pytest.mark.skipif(sys.platform != "linux" or APPLE, reason="the BLAS swap acts on Linux only")
def test_import_logs_a_second_mlx_build(tmp_path):
    """Importing aim_mlx with an MLX whose libmlx.so is mlx-cpu's though mlx-cuda-12 is installed too (as
    uv leaves it, by chance, for `aim-mlx[cuda]`): the CPU, the fast BLAS, and a warning on how to switch."""
    site = _site(tmp_path, 21, mlx_cpu=21, mlx_cuda_12=125)
    done = _import_aim_mlx({}, str(site))
    assert done.stdout.strip() == '[true, "cpu", ["mlx-cuda-12"]]'
    assert (
        "aim-mlx: mlx-cuda-12 is installed, but mlx-cpu's libmlx.so (the same file) is in place"
        in done.stderr
    )
