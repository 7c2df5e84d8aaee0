"""benchmarks/bench_peers.py on a tiny AIMv2: every engine (aim-mlx, ONNX Runtime, OpenVINO, torch), each in
its own process, gives the outputs of transformers' reference model for the same checkpoint, and an engine
whose outputs are wrong is caught."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoints import TINY, make_reference, reference_outputs

from aim_mlx.tasks.bench.harness import pixels

pytest.importorskip("onnxruntime", reason="bench_peers needs the bench extra (onnxruntime)")
pytest.importorskip("openvino", reason="bench_peers needs the bench extra (openvino)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers  # noqa: E402

FAST = ["--size", "tiny", "--batch-sizes", "1,2", "--rounds", "1", "--trials", "1"]


def test_every_engine_matches_transformers_reference(tmp_path):
    result = bench_peers.main([*FAST, "--json", str(tmp_path / "result.json")])
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["agreement"] == result["agreement"]
    assert len(result["agreement"]) == 2 * 6  # every pair of the four engines, at both batch sizes
    assert max(max(a["last_hidden_state"], a["pooled"]) for a in result["agreement"]) < bench_peers.TOLERANCE
    timed = {(r["engine"], r["batch"]) for r in result["results"]}
    assert timed == {(e, b) for e in bench_peers.ENGINES for b in (1, 2)}
    assert (
        "FullyConnected" in result["kernels"]["openvino"]
    )  # its matmuls' primitives, from its runtime graph

    # Against the independent reference: the model the checkpoint was written from, with eager attention.
    ref_model = make_reference(seed=0, image_size=56, **TINY["large"])
    for batch in (1, 2):
        ref = reference_outputs(ref_model, pixels(batch, 56))["last_hidden_state"]  # (B, N, D)
        for name, (hidden, pooled) in result["outputs"][batch].items():
            assert bench_peers.rel_err(hidden, ref) < 1e-5, name
            assert bench_peers.rel_err(pooled, ref.mean(axis=1)) < 1e-5, name


def test_a_wrong_engine_is_caught():
    # The comparison flags a perturbed output, and only in the pairs it is in.
    x = np.random.default_rng(0).standard_normal((2, 16, 8)).astype(np.float32)
    good, bad = (x, x.mean(axis=1)), (x * np.float32(1.002), x.mean(axis=1))
    found = bench_peers.disagreements({"a": good, "b": good, "c": bad})
    assert found[("a", "b")] == [0.0, 0.0]
    c_is_ref = pytest.approx(0.002 / 1.002, rel=1e-4)
    assert found[("a", "c")][0] == c_is_ref and found[("a", "c")][1] == 0.0
    assert found[("b", "c")][0] > bench_peers.TOLERANCE

    # In the run's own table: one engine's pooled output off by 0.2 % shows in its pairs, at its batch size.
    outputs = {1: {"aim-mlx": good, "onnxruntime": good, "openvino": (x, 1.002 * x.mean(axis=1))}}
    rows = bench_peers.agreement(outputs)
    wrong = {tuple(r["engines"]) for r in rows if r["pooled"] > bench_peers.TOLERANCE}
    assert wrong == {("aim-mlx", "openvino"), ("onnxruntime", "openvino")}
    assert all(r["last_hidden_state"] == 0.0 for r in rows)
