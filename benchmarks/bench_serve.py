"""The embeddings server (`aim-mlx serve`, issue #28) against offline `embed`, in the same run.

    python benchmarks/bench_serve.py [--size small] [--clients 1,4,16,64] [--requests 64]

A real `aim-mlx serve` process (batch 8, 5 ms batch wait) holds a random-weight AIMv2 vision model at 224 px
and a random-weight LiT; this process sends it single-image requests (JPEG data URIs, built beforehand)
from 1, 4, 16 and 64 client threads at once, and single-text requests from 16. Its peer: offline `embed`
(aim_mlx.tasks.embed.embed_images, decoding on threads, batch 8) on the same JPEG files with the same
model, measured before and after the server runs (their median). Prints, per concurrency, images/s, its
ratio to offline, and p50/p95 latency; text requests/s; and a lone request's latency split into the model's
forward pass on one decoded image, decoding one image, and the rest (HTTP, JSON, base64, batching).
Target: >= 0.9x offline from 16 clients on; a lone request within one forward pass + 10 ms.

Sizes: tiny (2 blocks of width 128: the overheads dominate), small (8 blocks of 384), large (AIMv2-L/14,
24 blocks of 1024: about 0.8 images/s on a 2-core CPU, so give it few --requests).
"""

import argparse
import base64
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {
    "tiny": dict(hidden_size=128, num_attention_heads=1, intermediate_size=352, num_hidden_layers=2),
    "small": dict(hidden_size=384, num_attention_heads=3, intermediate_size=1024, num_hidden_layers=8),
    "large": dict(hidden_size=1024, num_attention_heads=8, intermediate_size=2816, num_hidden_layers=24),
}
FULL_TEXT = dict(hidden_size=768, num_attention_heads=6, intermediate_size=2048, num_hidden_layers=12)


def checkpoints(root: Path, size: str) -> tuple[Path, Path]:
    from checkpoints import make_reference, write_checkpoint, write_processor
    from lit_checkpoints import make_lit_reference, write_lit_checkpoint

    vision = write_processor(write_checkpoint(make_reference(0, 224, **SIZES[size]), root / "vision"), 224)
    text = FULL_TEXT if size == "large" else None
    lit = write_processor(write_lit_checkpoint(make_lit_reference(1, text=text), root / "lit"))
    return vision, lit


def start_server(vision: Path, lit: Path, batch: int):
    command = [sys.executable, "-m", "aim_mlx", "serve", "-m", str(vision), "-m", str(lit)]
    command += ["--port", "0", "--batch-size", str(batch), "--queue-size", "1024"]
    env = {**os.environ, "AIM_MLX_DATA": tempfile.mkdtemp()}  # no library: the API alone
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    line = lines.get(timeout=300)
    if not line.startswith("serving the embeddings API at "):
        process.kill()
        raise SystemExit(f"the server did not start: {line}")
    return process, line.split(" at ")[1].split("/v1")[0]


def cpu_seconds(pid: int) -> float | None:
    """A process's user + system CPU time (all its threads), from /proc; None where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, bodies: list[bytes], clients: int, requests: int, server_pid: int) -> dict:
    """`requests` POSTs (bodies in turn) from `clients` threads, each one request at a time; and the
    server's CPU time per request (on a shared machine, wall-clock rates carry the other tenants' load)."""
    import httpx

    latencies = []
    cpu = cpu_seconds(server_pid)

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for n in range(index, requests, clients):
                start = time.perf_counter()
                answer = http.post(
                    url + "/v1/embeddings",
                    content=bodies[n % len(bodies)],
                    headers={"content-type": "application/json"},
                )
                latencies.append(time.perf_counter() - start)
                assert answer.status_code == 200, answer.text

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    cpu = None if cpu is None else cpu_seconds(server_pid) - cpu
    return {
        "clients": clients,
        "requests": requests,
        "per_s": requests / wall,
        "per_cpu_s": None if not cpu else requests / cpu,
        "p50_ms": 1e3 * float(np.median(latencies)),
        "p95_ms": 1e3 * float(np.percentile(latencies, 95)),
        "min_ms": 1e3 * min(latencies),
    }


def offline(model, processor, paths: list[Path], batch: int) -> float:
    from aim_mlx.tasks.embed import embed_images

    start, cpu = time.perf_counter(), time.process_time()
    result = embed_images(model, processor, paths, batch_size=batch)
    assert len(result.embeddings) == len(paths)
    return len(paths) / (time.perf_counter() - start), len(paths) / (time.process_time() - cpu)


def lone_parts(model, processor, path: Path, trials: int = 10) -> dict:
    """One image's forward pass (decoded beforehand) and its decoding alone: the best of `trials`, in ms
    (the least disturbed by other work on a shared machine)."""
    import mlx.core as mx

    from aim_mlx.inputs.images import load_image_bytes

    data = path.read_bytes()
    decode, forward = [], []
    for _ in range(trials):
        start = time.perf_counter()
        pixels = processor.preprocess_one(load_image_bytes(data, "bench"))
        decode.append(time.perf_counter() - start)
        start = time.perf_counter()
        np.asarray(model.encode_image(mx.array(pixels[None])).astype(mx.float32))
        forward.append(time.perf_counter() - start)
    return {"forward_ms": 1e3 * min(forward), "decode_ms": 1e3 * min(decode)}


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=64, help="single-image requests per concurrency")
    parser.add_argument("--text-requests", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from bench_library import photos

    import aim_mlx
    from aim_mlx.tasks.bench.timing import header, machine

    print(header(machine()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vision, lit = checkpoints(tmp, args.size)
        (tmp / "photos").mkdir()
        paths = photos(tmp / "photos", 32)
        model, processor = aim_mlx.load(str(vision))
        offline(model, processor, paths[:8], args.batch)  # warm-up
        runs = [offline(model, processor, paths, args.batch)]
        parts = lone_parts(model, processor, paths[0])

        image_bodies = [
            json.dumps(
                {
                    "model": "vision",
                    "input": [
                        {"image": "data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()}
                    ],
                }
            ).encode()
            for p in paths
        ]
        texts = [f"a photo of a {w}" for w in ("cat", "dog", "rocket", "coffee cup", "astronaut", "coin")]
        text_bodies = [json.dumps({"model": "lit", "input": [t]}).encode() for t in texts]
        process, url = start_server(vision, lit, args.batch)
        try:
            load(url, image_bodies, 4, 16, process.pid)  # warm-up
            lone = load(url, image_bodies, 1, 20, process.pid)
            rows = [
                load(url, image_bodies, int(c), args.requests, process.pid) for c in args.clients.split(",")
            ]
            load(url, text_bodies, 4, 16, process.pid)
            text = load(url, text_bodies, 16, args.text_requests, process.pid)
            text_lone = load(url, text_bodies, 1, 20, process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
        runs.append(offline(model, processor, paths, args.batch))
    rates = [wall for wall, _ in runs]
    rate, cpu_rate = float(np.median(rates)), float(np.median([cpu for _, cpu in runs]))
    for row in rows:
        row["ratio_to_offline"] = row["per_s"] / rate
        row["cpu_ratio_to_offline"] = row["per_cpu_s"] / cpu_rate if row["per_cpu_s"] else None
    overhead = lone["min_ms"] - parts["forward_ms"]  # best against best
    out = {
        "size": args.size,
        "batch": args.batch,
        "offline_images_per_s": rate,
        "offline_runs": rates,
        "offline_images_per_cpu_s": cpu_rate,
        "load_average": os.getloadavg(),
        "images": rows,
        "lone_image": {
            **parts,
            "request_p50_ms": lone["p50_ms"],
            "request_p95_ms": lone["p95_ms"],
            "request_min_ms": lone["min_ms"],
            "overhead_ms": overhead,
            "http_and_batching_ms": overhead - parts["decode_ms"],
        },
        "texts": {
            "clients": 16,
            "requests_per_s": text["per_s"],
            "p50_ms": text["p50_ms"],
            "p95_ms": text["p95_ms"],
            "lone_p50_ms": text_lone["p50_ms"],
        },
    }
    runs_text = ", ".join(f"{r:.1f}" for r in rates)
    print(f"offline embed, batch {args.batch}: {rate:.1f} images/s (runs: {runs_text})")
    print(f"offline, per CPU-second: {cpu_rate:.1f} images; load average {os.getloadavg()[0]:.1f}")
    print("clients  images/s  x offline  p50 ms  p95 ms  images/CPU-s  x offline")
    for row in rows:
        cpu = f"{row['per_cpu_s']:>12.1f}  {row['cpu_ratio_to_offline']:>9.2f}" if row["per_cpu_s"] else ""
        print(
            f"{row['clients']:>7}  {row['per_s']:>8.1f}  {row['ratio_to_offline']:>9.2f}  "
            f"{row['p50_ms']:>6.1f}  {row['p95_ms']:>6.1f}  {cpu}"
        )
    print(
        f"lone image request: best {lone['min_ms']:.1f} ms (p50 {lone['p50_ms']:.1f}) = best forward "
        f"{parts['forward_ms']:.1f} + decode {parts['decode_ms']:.1f} + HTTP/JSON/base64/batching "
        f"{overhead - parts['decode_ms']:.1f}"
    )
    print(
        f"texts, 16 clients: {text['per_s']:.1f} requests/s (p50 {text['p50_ms']:.1f} ms); "
        f"lone {text_lone['p50_ms']:.1f} ms"
    )
    print(json.dumps(out))
    print(f"# cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
