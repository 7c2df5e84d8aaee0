"""Converted and quantized AIMv2-L/14-224 folders against float32: size, memory, speed, agreement.

    python benchmarks/bench_quant.py [--batch 8] [--trials 3] [--rounds 1] [--half-compute]

Writes a random-weight AIMv2-L/14-224 checkpoint, converts it with `aim_mlx.convert` to float32, bfloat16,
float16, 8-bit, 4-bit and the mixed recipes (each conversion in a fresh process, whose peak RSS is
reported against the float32 checkpoint size), then for each folder reports: file size; resident weight
memory (bytes of the loaded parameters); images/s at `--batch` through `aim-mlx bench`'s runner (a fresh
process each, CPU default compute dtype float32, so half-precision folders are upcast on load); and the
cosine similarity of pooled embeddings against float32 on photos from scikit-image.

MLX's CPU backend has no BLAS path for float16/bfloat16 matmuls (~3 GFLOP/s), so computing in them takes
about a minute per image for AIMv2-L: `--half-compute` adds one timed batch-1 call for each.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
)
CONFIGS = {  # name -> convert() options
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "float16": dict(dtype="float16"),
    "8-bit": dict(quantize=True, q_bits=8),
    "4-bit": dict(quantize=True, q_bits=4),
    "mixed_4_8": dict(quantize=True, quant_predicate="mixed_4_8"),
    "ends_4_8": dict(quantize=True, quant_predicate="ends_4_8"),
}
# Converts in a child process and prints its peak RSS (MB), so that the figure is the conversion's own.
CONVERT_CHILD = """
import json, sys
import aim_mlx
from aim_mlx.tasks.bench.timing import peak_rss_mb
from aim_mlx.convert.convert import convert
convert(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
print(peak_rss_mb())
"""


def photos(size: int):
    import numpy as np
    import skimage.data
    from PIL import Image

    from aim_mlx.inputs.preprocess import ImageProcessor

    images = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        images.append(Image.fromarray(pixels[..., :3]))
    return ImageProcessor.clip(size)(images)


def weights_and_embeddings(folder: Path, x):
    """Resident parameter bytes and pooled embeddings of photos `x`, loaded as `aim-mlx embed` would."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    import aim_mlx

    model, _ = aim_mlx.load(str(folder))
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    emb = np.asarray(model.encode_image(x).astype(mx.float32))
    return resident, emb


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--trials", type=int, default=3, help="timed calls per configuration and round")
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds, each starting every configuration afresh"
    )
    parser.add_argument("--half-compute", action="store_true", help="also time float16/bfloat16 compute")
    args = parser.parse_args()

    import numpy as np
    from checkpoints import LARGE, make_reference, write_checkpoint

    from aim_mlx.tasks.bench.harness import run_isolated
    from aim_mlx.tasks.bench.timing import header, machine, summarize

    info = machine()
    print(header(info))
    rows = {name: {"config": name} for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        source = write_checkpoint(make_reference(seed=0, image_size=224, **LARGE), Path(tmp) / "source", "hf")
        source_bytes = (source / "model.safetensors").stat().st_size
        print(f"# random-weight AIMv2-L/14-224 checkpoint: {source_bytes / 1e6:.0f} MB (float32)")
        folders = {}
        for name, options in CONFIGS.items():
            folders[name] = Path(tmp) / name
            done = subprocess.run(
                [sys.executable, "-c", CONVERT_CHILD, str(source), str(folders[name]), json.dumps(options)],
                capture_output=True,
                text=True,
                check=True,
            )
            weight_files = [p for p in folders[name].iterdir() if p.suffix == ".safetensors"]
            rows[name]["file_mb"] = sum(p.stat().st_size for p in weight_files) / 1e6
            rows[name]["convert_peak_rss_x"] = float(done.stdout.split()[-1]) * 2**20 / source_bytes
            print(f"converted {name}", file=sys.stderr, flush=True)

        x = photos(224)
        embeddings = {}
        for name, folder in folders.items():
            resident, embeddings[name] = weights_and_embeddings(folder, x)
            rows[name]["resident_weights_mb"] = resident / 2**20
        ref = embeddings["float32"]
        for name, emb in embeddings.items():
            cos = (emb * ref).sum(-1) / np.linalg.norm(emb, axis=-1) / np.linalg.norm(ref, axis=-1)
            rows[name]["cosine_min"], rows[name]["cosine_mean"] = float(cos.min()), float(cos.mean())

        timed = {name: [] for name in CONFIGS}
        for round_ in range(args.rounds):
            order = list(CONFIGS) if round_ % 2 == 0 else list(CONFIGS)[::-1]
            for name in order:  # `aim-mlx bench`'s runner: a fresh process per configuration
                spec = {"engine": "aim-mlx", "model": str(folders[name]), "dtype": "float32"}
                spec.update(batch=args.batch, image_size=None, trials=args.trials, warmup=1)
                timed[name].append(run_isolated(spec))
                print(
                    f"timed {name}: {timed[name][-1]['images_per_s']:.3f} images/s",
                    file=sys.stderr,
                    flush=True,
                )
        for name, runs in timed.items():
            times = [t for run in runs for t in run["times"]]
            rows[name].update(summarize(times, args.batch, runs[0]["flops_per_image"]))
            rows[name]["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        if args.half_compute:
            for name in ("bfloat16", "float16"):
                spec = {"engine": "aim-mlx", "model": str(folders[name]), "dtype": name}
                spec.update(batch=1, image_size=None, trials=1, warmup=0)
                rows[name]["half_compute_images_per_s"] = run_isolated(spec)["images_per_s"]

    base = rows["float32"]
    print(
        f"\n{'config':10} {'file MB':>8} {'weights MB':>10} {'x fp32':>6} {'img/s':>6} {'x fp32':>6} "
        f"{'cos min':>8} {'cos mean':>8} {'peak RSS':>9} {'convert peak':>12}"
    )
    for r in rows.values():
        print(
            f"{r['config']:10} {r['file_mb']:8.0f} {r['resident_weights_mb']:10.0f} "
            f"{r['resident_weights_mb'] / base['resident_weights_mb']:6.3f} {r['images_per_s']:6.3f} "
            f"{r['images_per_s'] / base['images_per_s']:6.2f} {r['cosine_min']:8.5f} {r['cosine_mean']:8.5f} "
            f"{r['peak_rss_mb']:7.0f}MB {r['convert_peak_rss_x']:11.2f}x"
        )
        if "half_compute_images_per_s" in r:
            print(
                f"{'':10} computing in {r['config']} (batch 1): {r['half_compute_images_per_s']:.4f} images/s"
            )
    print(json.dumps({"machine": info, "batch": args.batch, "results": list(rows.values())}))


if __name__ == "__main__":
    main()
