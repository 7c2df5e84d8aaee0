"""Videos (inputs/video.py): the frames chosen, on videos PyAV writes at test time from scikit-image photos
(tests/media.py), against how they were written: photo k fills seconds [k, k+1), so one frame per scene at
k seconds, showing photo k. Also the cap, a still video, the creation time and Apple's tags, frames read
back by name, bad files, the missing extra, and `aim-mlx embed clip.mp4`."""

import json
import sys
from datetime import datetime, timezone

import av
import numpy as np
import pytest
import skimage.data
from checkpoints import TINY, make_reference, write_checkpoint, write_processor
from media import write_video
from PIL import Image
from typer.testing import CliRunner

import aim_mlx
from aim_mlx.cli import app
from aim_mlx.errors import ImageError
from aim_mlx.inputs import video
from aim_mlx.inputs.images import find_images, load_image
from aim_mlx.inputs.metadata import Metadata, read_metadata

PHOTOS = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
SIZE = (320, 240)


def shown(photo: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize(SIZE), np.float64)


def correlation(a, b) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    return {
        # x264 starts a keyframe at each cut: the keyframes alone are the candidates
        "mp4": write_video(folder / "clip.mp4", PHOTOS),
        # VP9 as written here has one keyframe: sampled every second by one decode through
        "webm": write_video(folder / "clip.webm", PHOTOS, codec="libvpx-vp9"),
        "mkv": write_video(folder / "clip.mkv", PHOTOS, codec="mpeg4", creation_time=None),
        # one photo for 3 s, a keyframe every half second: one scene
        "still": write_video(folder / "still.mp4", PHOTOS[:1], seconds=3, options={"g": "5"}),
    }


@pytest.mark.parametrize("kind", ["mp4", "webm", "mkv"])
def test_one_frame_per_scene_at_its_start_showing_its_photo(clips, kind):
    frames = video.video_frames(clips[kind])
    assert [f.time for f in frames] == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)  # photo k from k seconds
    for k, frame in enumerate(frames):
        assert frame.image.mode == "RGB" and frame.image.size == SIZE
        scores = [correlation(frame.image, shown(photo)) for photo in PHOTOS]
        assert scores[k] > 0.95 and int(np.argmax(scores)) == k, scores


def test_a_still_video_gives_one_frame_and_the_cap_keeps_the_first(clips):
    assert [f.time for f in video.video_frames(clips["still"])] == [0.0]
    capped = [f.time for f in video.video_frames(clips["mp4"], max_frames=2)]
    assert len(capped) == 2 and capped[0] == 0.0 and capped[1] in (1.0, 2.0)
    assert [f.time for f in video.video_frames(clips["mp4"], max_frames=1)] == [0.0]


def test_more_scenes_than_the_cap_keep_the_biggest_changes(tmp_path):
    # scenes: astronaut, a slightly darker astronaut (a small change), coffee, chelsea
    darker = (PHOTOS[0] * 0.8).astype(np.uint8)
    scenes = [PHOTOS[0], darker, PHOTOS[1], PHOTOS[2]]
    path = write_video(tmp_path / "four.mp4", scenes, options={"g": "10"})  # a keyframe every second
    every = video.video_frames(path, threshold=0.05)
    assert [f.time for f in every] == [0.0, 1.0, 2.0, 3.0]
    assert [f.time for f in video.video_frames(path, max_frames=3, threshold=0.05)] == [0.0, 2.0, 3.0]


def test_a_scene_that_comes_back_is_kept_once(tmp_path):
    back = write_video(tmp_path / "back.mp4", [PHOTOS[0], PHOTOS[1], PHOTOS[0], PHOTOS[2]])
    assert [f.time for f in video.video_frames(back)] == [0.0, 1.0, 3.0]  # not astronaut again at 2 s


def test_a_portrait_video_is_turned_upright(tmp_path):
    path = write_video(tmp_path / "portrait.mp4", PHOTOS[2:], rotation=-90)  # stored sideways
    frame = video.video_frames(path)[0].image
    assert frame.size == (SIZE[1], SIZE[0])
    upright = np.rot90(shown(PHOTOS[2]), k=-1)  # a quarter turn clockwise, as players show it
    assert correlation(frame, upright) > 0.95
    np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(frame))


def test_a_frame_reads_back_by_its_name(clips):
    frames = video.video_frames(clips["mp4"])
    names = [video.frame_name(clips["mp4"], f.time) for f in frames]
    assert [n.name for n in names] == ["clip.mp4#t=0.000", "clip.mp4#t=1.000", "clip.mp4#t=2.000"]
    for name, frame in zip(names, frames, strict=True):
        np.testing.assert_array_equal(np.asarray(load_image(name)), np.asarray(frame.image))
    np.testing.assert_array_equal(np.asarray(load_image(clips["mp4"])), np.asarray(frames[0].image))
    assert video.parse_frame_name(names[1]) == (clips["mp4"], 1.0)
    assert video.parse_frame_name(clips["mp4"]) is None


def test_folders_list_each_video_as_its_frames(clips):
    found = [p.name for p in find_images([clips["mp4"].parent], videos=True, max_frames=2)]
    assert [name for name in found if name.startswith("clip.mp4")] == ["clip.mp4#t=0.000", "clip.mp4#t=1.000"]
    assert [name for name in found if name.startswith("still")] == ["still.mp4#t=0.000"]
    assert not any(video.is_video(p) for p in find_images([clips["mp4"].parent]))  # images only by default


def test_creation_time_from_the_container(clips):
    utc = datetime(2023, 6, 14, 16, 30, tzinfo=timezone.utc)  # what write_video put there
    assert video.creation_time(clips["mp4"]) == utc
    assert read_metadata(clips["mp4"]) == Metadata(utc.astimezone().replace(tzinfo=None))  # local, naive
    assert video.creation_time(clips["mkv"]) is None and read_metadata(clips["mkv"]) == Metadata()


def test_apple_tags_give_the_local_time_place_and_camera(tmp_path):
    path = tmp_path / "IMG_0001.mov"
    with av.open(str(path), "w", options={"movflags": "use_metadata_tags"}) as out:
        out.metadata.update(
            {
                "creation_time": "2023-06-14T16:30:00Z",
                "com.apple.quicktime.creationdate": "2023-06-14T18:30:00+0200",
                "com.apple.quicktime.location.ISO6709": "+48.8582+002.2945+035.000/",
                "com.apple.quicktime.make": "Apple",
                "com.apple.quicktime.model": "iPhone 15 Pro",
            }
        )
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.mux(stream.encode(av.VideoFrame.from_image(Image.new("RGB", (64, 48)))))
        out.mux(stream.encode())
    found = read_metadata(path)
    assert found == Metadata(datetime(2023, 6, 14, 18, 30), 48.8582, 2.2945, "Apple iPhone 15 Pro")


def test_bad_videos_are_one_line_naming_them(clips, tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    data = clips["mp4"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # its index (moov) is at the end
    start, end = data.index(b"mdat") + 4, data.index(b"moov") - 4  # the coded frames, then the index
    (tmp_path / "blank.mp4").write_bytes(data[:start] + bytes(end - start) + data[end:])  # frames zeroed
    sound = tmp_path / "sound.m4v"
    with av.open(str(sound), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    for name, reason in (
        ("noise.mp4", "not a video FFmpeg can read"),
        ("cut.mp4", "not a video FFmpeg can read"),
        ("sound.m4v", "has no video stream"),
        ("blank.mp4", "no frame of the video could be decoded"),
    ):
        for read in (video.video_frames, load_image):
            with pytest.raises(ImageError, match=rf"^{tmp_path / name}: {reason}") as err:
                read(tmp_path / name)
            assert "\n" not in str(err.value)
    assert list(video.expand_videos([tmp_path / "noise.mp4"])) == [tmp_path / "noise.mp4"]  # left to fail


def test_without_pyav_a_video_names_the_extra(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now fails as if it were not installed
    for read in (video.video_frames, load_image):
        with pytest.raises(ImageError, match=r"clip.mp4: reading videos needs PyAV; .*aim-mlx\[video\]"):
            read(clips["mp4"])
    assert read_metadata(clips["mp4"]) == Metadata()


def test_embed_gives_one_embedding_per_frame_named_by_its_time(clips, tmp_path):
    folder = tmp_path / "tiny"
    write_checkpoint(make_reference(seed=3, image_size=56, **TINY["large"]), folder, layout="hf")
    write_processor(folder)
    out = tmp_path / "frames.jsonl"
    args = ["embed", clips["mp4"], clips["still"], "-m", folder, "-o", out, "--max-frames", "2"]
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    frames = video.video_frames(clips["mp4"], max_frames=2)
    expected = [f"{clips['mp4']}#t={f.time:.3f}" for f in frames] + [f"{clips['still']}#t=0.000"]
    assert [r["path"] for r in rows] == expected
    model, processor = aim_mlx.load(str(folder))
    images = [f.image for f in frames] + [video.video_frames(clips["still"])[0].image]
    want = np.asarray(model.encode_image(processor(images)))
    np.testing.assert_allclose([r["embedding"] for r in rows], want, rtol=1e-4, atol=1e-5)
