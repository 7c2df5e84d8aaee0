"""Zero-shot costs of the full-size LiT model (AIMv2-L/224 + 12-layer text tower), fp32, random weights.

    python benchmarks/bench_zeroshot.py [--classes 1000]

1. Encoding ImageNet prompts: CLIP's 80 templates for `--classes` evenly spaced ImageNet classes are encoded
   (prompts/s); with all 1000 (the default, ~20 min on 2 cores) that is the full 80,000-prompt encode,
   otherwise its time is extrapolated from the rate. Tokenizing all 80,000 is timed in full.
2. `aim-mlx classify IMAGE --imagenet --template ...` on one image, in fresh processes: cold (1000 prompts
   encoded and cached), then warm (cache hit), against `aim-mlx embed IMAGE` with the same model (load plus
   one image forward). A warm run reads a (1000, 768) matrix whatever the template count, so the warm figure
   holds for `--templates imagenet` too.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def write_full_size_lit(folder: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from aim_mlx.inputs.preprocess import ImageProcessor
    from aim_mlx.models.config import LiTConfig
    from aim_mlx.models.lit import AIMv2LiT

    config = LiTConfig()  # the published sizes: vision AIMv2-L/224, text 768 x 12, projection 768
    model = AIMv2LiT(config)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    text = {k: getattr(config.text, k) for k in config.text.__dataclass_fields__}
    raw = {"projection_dim": 768, "vision_config": config.vision.to_dict(), "text_config": text}
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "preprocessor_config.json").write_text(json.dumps(ImageProcessor.clip(224).to_dict()))
    from lit_checkpoints import write_clip_vocab

    write_clip_vocab(folder)


def cli(*args, env) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-c", "from aim_mlx.cli import main; main()", *map(str, args)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--classes", type=int, default=1000, help="ImageNet classes whose 80 prompts are timed (1000: all)"
    )
    args = parser.parse_args()

    import numpy as np
    import skimage.data
    from PIL import Image

    import aim_mlx
    from aim_mlx.tasks import zeroshot
    from aim_mlx.tasks.bench.timing import header, machine, sgemm_gflops

    info = machine()
    print(header(info))
    print(f"# numpy sgemm now: {sgemm_gflops():.0f} GFLOP/s")
    classes, templates = zeroshot.imagenet_classes(), zeroshot.imagenet_templates()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_full_size_lit(tmp)
        model, processor = aim_mlx.load(str(tmp), dtype="float32")

        prompts = [t.format(c) for c in classes for t in templates]
        start = time.perf_counter()
        ids, _ = processor.tokenizer.encode(prompts)
        tokenize_s = time.perf_counter() - start
        lengths = (ids == processor.tokenizer.eos_id).argmax(axis=-1) + 1
        print(f"tokenize 1000 x 80 prompts: {tokenize_s:.2f} s; tokens per prompt: mean {lengths.mean():.1f}")

        subset = classes[:: len(classes) // args.classes][: args.classes]
        zeroshot.encode_prompts(model, processor, subset[:1], templates[:8])  # warm-up
        start = time.perf_counter()
        zeroshot.encode_prompts(model, processor, subset, templates)
        encode_s = time.perf_counter() - start
        rate = len(subset) * len(templates) / encode_s
        # Useful work: 2 FLOPs per weight of the 12 blocks per token up to each prompt's EOS.
        text = model.config.text
        per_token = (
            2
            * text.num_hidden_layers
            * (4 * text.hidden_size**2 + 3 * text.hidden_size * text.intermediate_size)
        )
        sub_ids, _ = processor.tokenizer.encode([t.format(c) for c in subset for t in templates])
        tokens = ((sub_ids == processor.tokenizer.eos_id).argmax(axis=-1) + 1).sum()
        print(
            f"encode {len(subset)} classes x 80 prompts: {encode_s:.1f} s = {rate:.0f} prompts/s "
            f"({per_token * tokens / encode_s / 1e9:.0f} useful GFLOP/s); "
            + (
                f"all 1000 x 80: {encode_s / 60:.1f} min"
                if len(subset) == len(classes)
                else f"1000 x 80 extrapolated: {len(prompts) / rate / 60:.1f} min"
            )
        )

        image = tmp / "cat.png"
        Image.fromarray(skimage.data.chelsea()).save(image)
        env = {**os.environ, "AIM_MLX_CACHE": str(tmp / "cache")}
        flags = ["--imagenet", "--template", "a photo of a {}.", "-m", tmp]
        cold = cli("classify", image, *flags, env=env)
        warm = [cli("classify", image, *flags, env=env) for _ in range(3)]
        embed = [cli("embed", image, "-m", tmp, env=env) for _ in range(3)]
        warm = np.median(warm)
        print(f"classify --imagenet (1000 prompts), one image: cold {cold:.1f} s, warm {warm:.1f} s")
        print(f"embed, one image, same model (load + one forward): {np.median(embed):.1f} s")


if __name__ == "__main__":
    main()
