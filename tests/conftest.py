import os
import sys
from pathlib import Path

# Tests never touch the network; the hub code reads the local cache only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


import socket  # noqa: E402

import emulation  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import constants  # noqa: E402

emulation.apply()  # AIM_MLX_EMULATE=apple: a Mac's defaults (see emulation.py), before aim_mlx is imported

import aim_mlx  # noqa: E402,F401  (first, so MLX gets the fast BLAS before anything imports mlx.core)


@pytest.fixture(params=["numpy", "mlx"])
def backend(request, monkeypatch):
    """What runs the blocks of the models a test loads (AIM_MLX_BACKEND): the numpy backend (float32 on a CPU
    with the fast BLAS), or the MLX blocks themselves (what Apple GPUs and half precision run)."""
    from aim_mlx.platform import blas

    if request.param == "numpy" and not blas.loaded():
        pytest.skip("the numpy backend needs the fast BLAS (Linux; not under AIM_MLX_EMULATE=apple)")
    monkeypatch.setenv("AIM_MLX_BACKEND", request.param)
    return request.param


@pytest.fixture
def network_attempts(monkeypatch):
    """Sockets refused; a test using this fails if anything tried one, even if it caught the error."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"tried the network: {attempts}"


@pytest.fixture
def cache(tmp_path, monkeypatch, network_attempts):
    """An empty Hugging Face cache under tmp_path, offline (see fakehub.py to fill it)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, when it is imported; its functions read the module values.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
