"""Core ML export of AIMv2-L/14-224 (random weights) at each precision and compression.

    python benchmarks/bench_coreml.py [--photos 2] [--cases float16-none,float16-int8]

For each package: export time (load, graph, conversion, compression, save), package size, and the numpy
evaluator's agreement with aim-mlx's MLX float32 output on scikit-image photos (what `--check` measures),
with the time that check took. Core ML's own prediction needs macOS and is not timed here.
"""

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CASES = [  # (precision, compression, minimum deployment target)
    ("float32", "none", "iOS17"),
    ("float16", "none", "iOS17"),
    ("float16", "int8", "iOS17"),
    ("float16", "int4", "iOS18"),
    ("float16", "palettize8", "iOS17"),
    ("float16", "palettize6", "iOS17"),
    ("float16", "palettize4", "iOS17"),
]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photos", type=int, default=2, help="scikit-image photos to verify on (1-4)")
    parser.add_argument("--cases", default=None, help="comma-separated precision-compression pairs")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("coremltools").setLevel(logging.ERROR)

    from aim_mlx.convert.coreml import check as coreml_check
    from aim_mlx.convert.coreml.export import export_coreml
    from checkpoints import LARGE, make_reference, write_checkpoint

    import aim_mlx
    from aim_mlx.tasks.bench.timing import header, machine

    cases = CASES
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in CASES if f"{c[0]}-{c[1]}" in wanted]
    info = machine()
    print(header(info))
    import coremltools

    print(f"# coremltools {coremltools.__version__}, aim-mlx {aim_mlx.__version__}, {args.photos} photos")
    print("| precision | compression | target | export s | package MB | check s | cosine | max rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    photos = coreml_check.photos()[: args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(make_reference(seed=0, image_size=224, **LARGE), Path(tmp) / "ckpt", "hf")
        model = aim_mlx.load(str(folder), dtype="float32")[0]
        for precision, compress, target in cases:
            path = Path(tmp) / f"{precision}-{compress}.mlpackage"
            done = export_coreml(str(folder), path, precision=precision, compress=compress, target=target)
            start = time.perf_counter()
            report = coreml_check.check_package(path, model, photos)
            check_s = time.perf_counter() - start
            print(
                f"| {precision} | {compress} | {target} | {done.seconds:.1f} | {done.size_bytes / 1e6:.1f} | "
                f"{check_s:.1f} | {report['cosine']:.6f} | {report['max_rel_error']:.2e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
