"""Reading RAW photos and videos, and `index --watch`'s delay (issue #29, "Performance").

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_media.py [--size small]

The model is a random-weight AIMv2 vision model at 224 px (tests/checkpoints.py), by default the small one
(8 blocks of 384, as bench_serve.py's `--size small`), so that the figures show the cost of reading and
decoding the files rather than the model's; `--size large` is AIMv2-L/14 (24 blocks of 1024).

- raw:   DNGs of a camera-like 6000x4000 sensor (tests/media.py's write_dng: scikit-image photos upscaled,
         mosaicked to RGGB), with a full-size embedded JPEG preview and without one (the half-size demosaic),
         against the same photos as JPEGs (the preview's own bytes). Per file (medians): load_image's decode
         time, and what index does besides (scan.py's sha256 of the file, and its header: size, EXIF);
         per folder: `index` images/s (index.py, batch 8, a fresh library; --rounds in turns, median).
- video: a 60 s 1280x720 H.264 clip (PyAV, tests/media.py's write_video) of six photos, a scene every 10 s.
         Frames chosen per minute of video (video_frames' time alone), and `index`'s seconds per minute.
- watch: watch() (apps/library/watch.py, on a thread) over a folder; each new JPEG is written in chunks and
         the time from its last write (the close) to its row in the library (a reader polled every 10 ms) is
         taken, for the default --debounce-ms/--settle-ms (1000/1000) and for 100/100.
Every part checks its own results: every file indexed and none failed, the frames one per scene, each
watched file found by an image search of its own photo, first.
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]


def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    import skimage.data
    from PIL import Image

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC) if size else image)


def model_folder(root: Path, size: str) -> Path:
    from bench_serve import SIZES
    from checkpoints import make_reference, write_checkpoint, write_processor

    return write_processor(write_checkpoint(make_reference(0, 224, **SIZES[size]), root / "model"), 224)


def timed_index(folder: Path, model, processor, db: Path) -> tuple[float, object]:
    from aim_mlx.apps.library.db import Library
    from aim_mlx.apps.library.index import index

    start = time.perf_counter()
    with Library(db) as library:
        summary = index(library, model, processor, [folder], batch_size=8)
    return time.perf_counter() - start, summary


def bench_raw(tmp: Path, model, processor, files: int, size: tuple[int, int], rounds: int) -> dict:
    from aim_mlx.apps.library.db import FileFacts
    from aim_mlx.apps.library.scan import header, sha256
    from media import jpeg_bytes, write_dng

    from aim_mlx.inputs.images import load_image

    kinds = ("jpeg", "dng+preview", "dng")
    folders = {k: tmp / k for k in kinds}
    for f in folders.values():
        f.mkdir()
    start = time.perf_counter()
    for i in range(files):
        pixels = photo(NAMES[i % len(NAMES)], size)
        pixels = np.ascontiguousarray(np.roll(pixels, 97 * i, axis=1))  # no two files the same
        preview = jpeg_bytes(pixels)
        (folders["jpeg"] / f"{i:02d}.jpg").write_bytes(preview)
        write_dng(folders["dng+preview"] / f"{i:02d}.dng", pixels, preview=preview)
        write_dng(folders["dng"] / f"{i:02d}.dng", pixels)
    written = time.perf_counter() - start
    out = {"files": files, "sensor": f"{size[0]}x{size[1]}", "written_s": written}
    for kind, folder in folders.items():
        paths = sorted(folder.iterdir())
        load_image(paths[0])  # warm-up (libraries' first calls)
        decode, hashing, headers, shapes = [], [], [], set()
        for path in paths:
            t = time.perf_counter()
            image = load_image(path)
            image.load()
            decode.append(time.perf_counter() - t)
            shapes.add(image.size)
            t = time.perf_counter()
            found = FileFacts(str(path), 0, 0, sha256(path))
            hashing.append(time.perf_counter() - t)
            t = time.perf_counter()
            header(found)
            headers.append(time.perf_counter() - t)
        out[kind] = {
            "decode_ms_p50": 1e3 * float(np.median(decode)),
            "hash_ms_p50": 1e3 * float(np.median(hashing)),
            "header_ms_p50": 1e3 * float(np.median(headers)),
            "decoded_size": sorted(shapes),
            "file_mb": sum(p.stat().st_size for p in paths) / files / 1e6,
        }
    rates = {kind: [] for kind in kinds}
    for r in range(rounds):  # the folders in turns, the order reversed each round: noise falls on all alike
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            seconds, summary = timed_index(folders[kind], model, processor, tmp / f"{kind}{r}.sqlite")
            assert summary.embedded == files and not summary.failed, (kind, summary)
            rates[kind].append(files / seconds)
    for kind in kinds:
        out[kind]["index_images_per_s"] = float(np.median(rates[kind]))
        out[kind]["index_all"] = [round(x, 3) for x in rates[kind]]
        print(json.dumps({kind: out[kind]}), flush=True)
    # the preview is what a camera shows: the JPEG's own pixels; without one, a half-size demosaic
    assert out["dng+preview"]["decoded_size"] == out["jpeg"]["decoded_size"] == [size]
    assert out["dng"]["decoded_size"] == [(size[0] // 2, size[1] // 2)]
    for kind in kinds[1:]:
        out[kind]["index_vs_jpeg"] = out[kind]["index_images_per_s"] / out["jpeg"]["index_images_per_s"]
    return out


def bench_video(tmp: Path, model, processor, seconds: int, scene: int) -> dict:
    from media import write_video

    from aim_mlx.inputs.video import video_frames

    folder = tmp / "videos"
    folder.mkdir()
    scenes = [photo(NAMES[i % len(NAMES)]) for i in range(seconds // scene)]
    start = time.perf_counter()
    path = write_video(folder / "clip.mp4", scenes, seconds=scene, fps=24, size=(1280, 720))
    written = time.perf_counter() - start
    t = time.perf_counter()
    frames = video_frames(path)
    choose = time.perf_counter() - t
    times = [round(f.time, 2) for f in frames]
    # one frame per scene, at (or just after) its start
    assert len(frames) == len(scenes), times
    assert all(abs(f.time - k * scene) < 1.0 for k, f in enumerate(frames)), times
    index_s, summary = timed_index(folder, model, processor, tmp / "video.sqlite")
    assert summary.embedded == 1 and not summary.failed, summary
    minutes = seconds / 60
    out = {
        "video": f"{seconds} s, 1280x720, 24 fps, H.264, a scene every {scene} s",
        "mb": path.stat().st_size / 1e6,
        "written_s": written,
        "frames": times,
        "frames_per_minute": len(frames) / minutes,
        "choose_s_per_minute": choose / minutes,
        "index_s_per_minute": index_s / minutes,
    }
    print(json.dumps(out), flush=True)
    return out


def bench_watch(tmp: Path, model_path: Path, files: int, settings: list[tuple[float, float]]) -> list[dict]:
    import io

    from aim_mlx.apps.library import watch as library_watch
    from aim_mlx.apps.library.db import Library
    from aim_mlx.apps.library.search import Vectors
    from PIL import Image

    import aim_mlx

    model, processor = aim_mlx.load(str(model_path))
    rows = []
    for debounce, settle in settings:
        root, db = tmp / f"watched-{debounce}", tmp / f"watch-{debounce}.sqlite"
        root.mkdir()
        Image.fromarray(photo("camera")).convert("RGB").save(root / "first.jpg")
        batches, stop, errors = [], threading.Event(), []

        def run(root=root, db=db, stop=stop, batches=batches, errors=errors, pause=(debounce, settle)):
            try:
                library_watch.watch(
                    [root],
                    db,
                    str(model_path),
                    debounce=pause[0],
                    settle=pause[1],
                    on_batch=lambda s, f: batches.append(s),
                    stop_event=stop,
                )
            except BaseException as exc:  # noqa: BLE001  (reported on this thread)
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while not batches:  # the first run over the folder: the watcher is started
            assert not errors and time.monotonic() < deadline, errors or "no first batch"
            time.sleep(0.02)
        delays = []
        try:
            for i in range(files):
                data = io.BytesIO()
                Image.fromarray(photo(NAMES[i % len(NAMES)])).save(data, "JPEG", quality=90)
                data = data.getvalue()
                path = root / f"new{i}.jpg"
                with open(path, "wb") as out:  # written in four chunks, 50 ms apart
                    for k in range(4):
                        out.write(data[k * len(data) // 4 : (k + 1) * len(data) // 4])
                        out.flush()
                        time.sleep(0.05)
                done = time.perf_counter()
                while True:
                    assert not errors, errors
                    assert time.perf_counter() - done < 60, f"{path} not indexed within 60 s"
                    with Library.reader(db) as library:
                        found = library.conn.execute(
                            "SELECT 1 FROM files WHERE path = ?", (str(path.resolve()),)
                        ).fetchone()
                    if found:
                        delays.append(time.perf_counter() - done)
                        break
                    time.sleep(0.01)
                # found by search: an image query of its own photo puts it first
                with Library.reader(db) as library:
                    vectors = Vectors.load(library, library.models()[0]["id"])
                query = np.asarray(model.encode_image(processor([Image.open(io.BytesIO(data))])))[0]
                hit = vectors.top_k(query, 1)[0]
                assert hit.path == str(path.resolve()), (hit.path, path)
                time.sleep(0.2)
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive() and not errors, errors
        row = {
            "debounce_ms": round(debounce * 1e3),
            "settle_ms": round(settle * 1e3),
            "files": files,
            "delay_s_p50": float(np.median(delays)),
            "delay_s_max": float(max(delays)),
            "delays": [round(d, 3) for d in delays],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="raw,video,watch")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "large"])
    parser.add_argument("--raw-files", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="raw: rounds of index over the folders")
    parser.add_argument("--sensor", default="6000x4000", help="raw: the DNGs' width x height")
    parser.add_argument("--video-seconds", type=int, default=60)
    parser.add_argument("--scene-seconds", type=int, default=10)
    parser.add_argument("--watch-files", type=int, default=4)
    args = parser.parse_args()
    from PIL import Image

    import aim_mlx
    from aim_mlx.tasks.bench.timing import header, machine

    print(header(machine()))
    print(f"# load average at the start: {os.getloadavg()}")
    parts = args.parts.split(",")
    out = {"size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = model_folder(tmp, args.size)
        model, processor = aim_mlx.load(str(folder))
        warm = [Image.fromarray(photo("camera"))] * 8
        np.asarray(model.encode_image(processor(warm)))  # warm-up, before any timing
        if "raw" in parts:
            width, height = (int(v) for v in args.sensor.split("x"))
            out["raw"] = bench_raw(tmp, model, processor, args.raw_files, (width, height), args.rounds)
        if "video" in parts:
            out["video"] = bench_video(tmp, model, processor, args.video_seconds, args.scene_seconds)
        if "watch" in parts:
            out["watch"] = bench_watch(tmp, folder, args.watch_files, [(1.0, 1.0), (0.1, 0.1)])
    print(json.dumps(out))
    print(f"# load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
