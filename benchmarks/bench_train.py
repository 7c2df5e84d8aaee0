"""`aim-mlx train`'s costs on the full-size AIMv2-L/14-224 (random weights, float32): feature extraction
against training, for the linear and the attentive probe.

    python benchmarks/bench_train.py [--images 1000] [--classes 10] [--epochs 20]

An ImageFolder set of `--images` images in `--classes` classes is made from scikit-image photos (each class
one photo under random crops and flips). For each probe: the first run computes the features (images/s, as
`embed` measures it) and trains; a second run with another learning rate finds every feature in the cache and
only trains (epochs/s). The token cache's size (float16 (N, 256, 1024) per image) is reported. Random weights
say nothing about accuracy; on a Mac with the real weights, measure it with
`aim-mlx train DATA -o HEAD` and `aim-mlx eval folder --data TEST -m HEAD`.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "moon",
    "page",
    "horse",
    "hubble_deep_field",
)


def write_full_size(folder: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from aim_mlx.inputs.preprocess import ImageProcessor
    from aim_mlx.models.aimv2 import AIMv2VisionEncoder
    from aim_mlx.models.config import VisionConfig

    config = VisionConfig()  # AIMv2-L/14-224: 1024 wide, 24 blocks, 8 heads
    model = AIMv2VisionEncoder(config)
    model.pos_embed = mx.random.normal(model.pos_embed.shape) * 0.02
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    (folder / "preprocessor_config.json").write_text(json.dumps(ImageProcessor.clip(224).to_dict()))


def write_folders(root: Path, images: int, classes: int) -> None:
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        name = PHOTOS[c % len(PHOTOS)]
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        (root / f"{c:02d}-{name}").mkdir(parents=True)
        for i in range(images // classes):
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.5, 0.9)), int(h * rng.uniform(0.5, 0.9))
            left, top = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            crop = photo.crop((left, top, left + cw, top + ch)).resize((256, 256))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(root / f"{c:02d}-{name}" / f"{i:04d}.jpg", quality=90)


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--probes", default="linear,attentive")
    args = parser.parse_args()

    import aim_mlx  # first, with the usual cache: the fast BLAS is set up at import
    from aim_mlx.tasks.bench.timing import header, machine
    from aim_mlx.tasks.train import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["AIM_MLX_CACHE"] = str(tmp / "cache")  # the feature cache starts empty

        print(header(machine()))
        (tmp / "model").mkdir()
        write_full_size(tmp / "model")
        write_folders(tmp / "data", args.images, args.classes)
        model, processor = aim_mlx.load(str(tmp / "model"), dtype="float32")
        print(f"# {args.images} images, {args.classes} classes, {args.epochs} epochs at most, float32")
        for probe in args.probes.split(","):
            runs = []
            for lr in (None, 3e-3):  # the second run: every feature cached
                start = time.perf_counter()
                report = train(
                    model,
                    processor,
                    tmp / "data",
                    tmp / probe,
                    probe=probe,
                    epochs=args.epochs,
                    lr=lr,
                    force=True,
                )
                runs.append((report, time.perf_counter() - start))
            (first, first_s), (second, second_s) = runs
            epochs_per_s = len(second.epochs) / second.train_seconds
            rate = first.forward_images / first.feature_seconds
            print(
                f"{probe}: features {first.feature_seconds:.1f} s ({rate:.2f} images/s); "
                f"training {first.train_seconds:.2f} s for {len(first.epochs)} epochs "
                f"({len(first.epochs) / first.train_seconds:.1f} epochs/s) = "
                f"{100 * first.train_seconds / first.feature_seconds:.1f} % of extraction; "
                f"cached rerun {second_s:.1f} s in all, {second.forward_images} images through the model, "
                f"{epochs_per_s:.1f} epochs/s"
                + (
                    f"; token cache {first.token_cache['bytes'] / 2**20:.0f} MiB "
                    f"({'in memory' if first.token_cache['in_memory'] else 'streamed'})"
                    if first.token_cache
                    else ""
                )
            )


if __name__ == "__main__":
    sys.exit(main())
