"""Videos through inference.py (video.py), confidence maps, and runs that survive being killed. Every video is made
here with PyAV from generated frames."""
import builtins
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import unet
import video
from conftest import noise, torch_threads
from dataset import read_photo
from test_inference import run, save_checkpoint, tiny_unet

av = pytest.importorskip("av")
REPO = Path(__file__).resolve().parents[1]


def moving_frames(count, height=48, width=64, seed=0):
    """Smooth random colours that drift a pixel per frame, like a slow pan."""
    scene = noise(np.random.default_rng(seed), height, width + count)
    return [np.ascontiguousarray(scene[:, step:step + width]) for step in range(count)]


def noisy_frames(count, height=48, width=64, seed=0):
    """Random pixels: every frame costs the encoder about as many bytes, so cutting a file in half cuts its frames."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def write_video(path, frames, rate=25, container_format=None, pix_fmt="yuv420p", options=None,
                sample_aspect_ratio=None, rotation=None, milliseconds=None):
    """An H.264 video of the RGB frames; rotation: a display matrix turning it counterclockwise, as phones tag;
    milliseconds: each frame's time (a variable frame rate)."""
    with av.open(str(path), "w", format=container_format) as output:
        stream = output.add_stream("libx264", rate=rate, options=options or {})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if sample_aspect_ratio:
            stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if milliseconds is not None:
                picture.pts, picture.time_base = milliseconds[index], Fraction(1, 1000)
            output.mux(stream.encode(picture))
        output.mux(stream.encode())
    return path


def decoded_frames(path):
    """Every frame as uint8 RGB, decoded independently of video.py; fails on any decoding error."""
    with av.open(str(path)) as container:
        container.streams.video[0].codec_context.options = {"err_detect": "explode"}
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def file_hashes(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_same_gray(gray, confidence):
    """The PNG holds round(255 x the API's confidence); a batch of frames rounds the logits' last bits differently
    from one frame alone, which moves a pixel sitting on a rounding boundary by one gray level at most."""
    difference = np.abs(gray.astype(np.int16) - np.round(confidence * 255).astype(np.int16))
    assert difference.max() <= 1 and (difference == 0).mean() >= 0.999


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(tmp_path / "unet_model.pth", tiny_unet())


def threads_of_a_new_thread():
    """The torch thread count a thread started now gets: the process's default, which torch.set_num_threads sets."""
    counts = []
    thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return counts[0]


@pytest.fixture
def two_threads():
    """Two torch threads, so that on any machine the video's model runs in two workers on half batches."""
    with torch_threads(2):
        yield


@pytest.mark.parametrize("size,rate,pix_fmt,suffix", [((48, 64), Fraction(30000, 1001), "yuv420p", ".mkv"),
                                                      ((47, 63), Fraction(25), "yuv444p", ".mp4")])
def test_overlay_video_has_every_frame_at_the_source_size_and_rate_and_frames_are_segmented_as_photos(
        tmp_path, checkpoint, size, rate, pix_fmt, suffix, two_threads):
    videos, output = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    source = write_video(videos / f"drive{suffix}", moving_frames(23, *size), rate, pix_fmt=pix_fmt)
    before = file_hashes(videos)
    assert run("--checkpoint", checkpoint, "--input", source, "--output", output, "--frames", "--save_confidence",
               "--batch_size", 4) == 0
    assert file_hashes(videos) == before
    with av.open(str(output / "drive_overlay.mp4")) as written:
        stream = written.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.codec_context.height, stream.codec_context.width) == size
        assert stream.average_rate == rate
    overlays, frames = decoded_frames(output / "drive_overlay.mp4"), decoded_frames(source)
    assert len(overlays) == len(frames) == 23
    segmenter = inference.Segmenter(checkpoint, device="cpu")
    with video.model_workers(segmenter) as (pool, _):  # with the thread count the video's model ran with
        as_photos = pool.submit(lambda: [segmenter(frame, confidence=True) for frame in frames]).result()
    expected = []
    for index, (frame, (mask, confidence)) in enumerate(zip(frames, as_photos)):
        np.testing.assert_array_equal(np.array(Image.open(output / "drive" / f"{index:06d}_mask.png")), mask)
        gray = np.array(Image.open(output / "drive" / f"{index:06d}_confidence.png")).astype(np.int16)
        assert_same_gray(gray, confidence)
        expected.append(inference.overlay(frame, mask, segmenter.class_table.colors, 0.5).astype(np.float32))
    # in order: each overlay frame is closest to its own frame's overlay, up to H.264's loss
    errors = np.array([[np.abs(shown - want).mean() for want in expected] for shown in overlays])
    assert (errors.argmin(1) == np.arange(23)).all() and errors.diagonal().max() < 10
    assert sorted(path.name for path in output.iterdir()) == ["drive", "drive_overlay.mp4"]


@pytest.mark.parametrize("rotation,turns", [(90, 1), (-90, 3), (180, 2)])
def test_a_rotated_phone_video_is_segmented_and_written_upright(tmp_path, checkpoint, rotation, turns, two_threads):
    stored = [frame.copy() for frame in moving_frames(6)]
    for frame in stored:
        frame[:, :32] = 255  # the stored frame's left half white
    source = write_video(tmp_path / "phone.mp4", stored, sample_aspect_ratio=Fraction(4, 3), rotation=rotation)
    output = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--input", source, "--output", output, "--frames",
               "--batch_size", 4) == 0
    upright = [np.ascontiguousarray(np.rot90(frame, turns)) for frame in decoded_frames(source)]
    overlays = decoded_frames(output / "phone_overlay.mp4")
    assert len(overlays) == 6 and overlays[0].shape == upright[0].shape == ((64, 48, 3) if turns % 2 else (48, 64, 3))
    white = {1: np.s_[32:], 3: np.s_[:32]}.get(turns, np.s_[:, 32:])  # where the white half is when shown upright
    assert all(overlay[white].mean() > overlay.mean() + 20 for overlay in overlays)
    with av.open(str(output / "phone_overlay.mp4")) as written:
        shape = Fraction(3, 4) if turns % 2 else Fraction(4, 3)  # a pixel on its side is as tall as it was wide
        assert written.streams.video[0].codec_context.sample_aspect_ratio == shape
        assert next(written.decode(video=0)).rotation == 0
    segmenter = inference.Segmenter(checkpoint, device="cpu")
    with video.model_workers(segmenter) as (pool, _):
        masks = pool.submit(lambda: [segmenter(frame) for frame in upright]).result()
    for index, mask in enumerate(masks):
        np.testing.assert_array_equal(np.array(Image.open(output / "phone" / f"{index:06d}_mask.png")), mask)


def test_a_variable_frame_rate_keeps_each_frames_time_and_a_broken_clock_keeps_the_frames_in_order(tmp_path,
                                                                                                  checkpoint):
    milliseconds = [0, 40, 80, 200, 240, 400, 440, 1000, 1040, 1080,  # pauses: 25 fps with gaps
                    90000, 90040]  # a jump 89 s ahead (a reset clock, not a pause): next in line
    source = write_video(tmp_path / "phone.mkv", moving_frames(len(milliseconds)), milliseconds=milliseconds)
    assert run("--checkpoint", checkpoint, "--input", source, "--output", tmp_path / "out") == 0
    with av.open(str(tmp_path / "out" / "phone_overlay.mp4")) as written:
        times = [round(float(frame.time), 3) for frame in written.decode(video=0)]
    assert times == [0, 0.04, 0.08, 0.2, 0.24, 0.4, 0.44, 1.0, 1.04, 1.08, 1.12, 1.16]


@pytest.mark.parametrize("milliseconds,ticks", [
    ([1000, 1041, None, 1200, 600, 1320, 1321], [0, 1, 2, 5, 6, 24, 25]),  # 600: joined recordings; 1321: too soon
    ([0, 40, 80, 90000, 90040, 90400, 90440], [0, 1, 2, 3, 4, 13, 14]),  # a reset clock, then a pause
    ([0, 40, 80, 120, 0, 40, 400, 440], [0, 1, 2, 3, 4, 5, 14, 15]),  # a clock going back, then a pause
    ([None, 0, 40, 80, 400], [0, 1, 2, 3, 11])])  # the first frame without a time
def test_frames_without_a_time_or_off_the_clock_come_next_and_later_times_count_from_them(tmp_path, milliseconds,
                                                                                         ticks):
    writer = video.OverlayWriter(av, tmp_path / "unused.mp4", 25)
    pictures = [av.VideoFrame(16, 16, "yuv420p") for _ in milliseconds]
    for picture, time_ms in zip(pictures, milliseconds):
        if time_ms is not None:
            picture.pts, picture.time_base = time_ms, Fraction(1, 1000)
    assert [writer.tick(picture, Fraction(25)) for picture in pictures] == ticks
    writer.discard()


@pytest.mark.parametrize("threads,workers,part_size", [(1, 1, 4), (4, 2, 2)])
def test_on_a_cpu_the_model_runs_in_two_workers_on_half_batches_and_thread_counts_are_restored(
        tmp_path, checkpoint, monkeypatch, threads, workers, part_size):
    source = write_video(tmp_path / "drive.mkv", moving_frames(24))
    model_calls, finishing_threads = set(), set()
    real_scores, real_finish = inference.Segmenter.scores, video.mask_and_confidence

    def recorded_scores(self, inputs):
        model_calls.add((threading.get_ident(), torch.get_num_threads(), len(inputs)))
        time.sleep(0.05)  # the first part is still running when the second comes
        return real_scores(self, inputs)

    def recorded_finish(*args, **kwargs):
        finishing_threads.add(torch.get_num_threads())
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(inference.Segmenter, "scores", recorded_scores)
    monkeypatch.setattr(video, "mask_and_confidence", recorded_finish)
    with torch_threads(threads):
        assert run("--checkpoint", checkpoint, "--input", source, "--output", tmp_path / "out", "--batch_size", 4) == 0
        started_later = threads_of_a_new_thread()
    assert len({ident for ident, _, _ in model_calls}) == workers
    assert {(count, size) for _, count, size in model_calls} == {(max(1, threads // 2), part_size)}
    assert finishing_threads == {threads} and started_later == threads
    assert len(decoded_frames(tmp_path / "out" / "drive_overlay.mp4")) == 24


def test_model_workers_leave_threads_started_later_the_callers_thread_count(checkpoint, two_threads):
    segmenter = inference.Segmenter(checkpoint, device="cpu")
    with video.model_workers(segmenter) as (pool, workers):
        assert workers == 2 and pool.submit(torch.get_num_threads).result() == 1
    assert threads_of_a_new_thread() == 2


SATURATED = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 64, 0),
             (0, 0, 0), (255, 255, 255), (64, 128, 192), (200, 30, 60)]


@pytest.mark.parametrize("pix_fmt,colorspace,matrix,color_range", [
    ("yuv420p", 2, None, 1),  # untagged: FFmpeg converts it to RGB as BT.601
    ("yuv420p", 1, "ITU709", 1),
    ("yuvj420p", 5, None, 2),  # BT.601, full range
    ("yuv444p", 1, "ITU709", 1)])
def test_the_overlay_blended_in_a_frames_own_yuv_planes_shows_what_the_rgb_overlay_shows(
        pix_fmt, colorspace, matrix, color_range):
    picture = av.VideoFrame.from_ndarray(noise(np.random.default_rng(0), 48, 64), format="rgb24").reformat(
        format=pix_fmt, dst_colorspace=matrix)
    picture.colorspace, picture.color_range = colorspace, color_range
    stripes = (np.arange(64)[None] // 6 % 11).repeat(48, 0).astype(np.uint8)  # 6 wide: no chroma block straddles two
    blended = video.PictureOverlay(av, SATURATED, 0.5)(picture, stripes)
    assert (blended.format.name, blended.colorspace, blended.color_range) == (pix_fmt, colorspace, color_range)
    expected = inference.overlay(picture.to_ndarray(format="rgb24"), stripes, SATURATED, 0.5).astype(np.int16)
    difference = np.abs(blended.to_ndarray(format="rgb24").astype(np.int16) - expected)
    assert difference.mean() < 1 and difference.max() <= 4  # the wrong matrix or range: mean 2.6, max 14 or more


def write_tagged_video(path, frames, codec="libx264", pix_fmt="yuv420p", matrix=None, color_range=None):
    """A video whose pictures are converted from RGB with `matrix` and `color_range` and tagged with them."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        if matrix is not None:
            stream.codec_context.colorspace, stream.codec_context.color_range = matrix, color_range
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if matrix is not None:
                picture = picture.reformat(format=pix_fmt, dst_colorspace=matrix, dst_color_range=color_range)
                picture.colorspace, picture.color_range = matrix, color_range
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return path


def assert_overlay_shows_each_frame(overlay_file, source, checkpoint, tolerance=6):
    """Decoded (each frame by its own colour tags), every overlay frame is its source frame's RGB overlay, up to
    H.264's loss: mean error about 4 here; decoded with the wrong matrix or range it is about 7.5 or more."""
    segmenter = inference.Segmenter(checkpoint, device="cpu")
    shown_frames, frames = decoded_frames(overlay_file), decoded_frames(source)
    height, width = shown_frames[0].shape[:2]
    for shown, frame in zip(shown_frames, frames, strict=True):
        frame = np.array(Image.fromarray(frame).resize((width, height), Image.BILINEAR)) if frame.shape != \
            shown.shape else frame
        expected = inference.overlay(frame, segmenter(frame), segmenter.class_table.colors, 0.5)
        assert np.abs(shown.astype(np.int16) - expected).mean() < tolerance


def test_the_overlay_video_is_in_the_sources_colour_matrix_and_range_and_says_so(tmp_path, checkpoint):
    source = write_tagged_video(tmp_path / "bt709.mp4", moving_frames(5), pix_fmt="yuvj420p", matrix=1, color_range=2)
    assert run("--checkpoint", checkpoint, "--input", source, "--output", tmp_path / "out") == 0
    with av.open(str(tmp_path / "out" / "bt709_overlay.mp4")) as written:
        context = written.streams.video[0].codec_context
        assert (context.colorspace, context.color_range) == (1, 2)  # untagged, the mean error below is 7.7
    assert_overlay_shows_each_frame(tmp_path / "out" / "bt709_overlay.mp4", source, checkpoint)


def test_an_rgb_coded_video_gets_a_bt601_overlay(tmp_path, checkpoint):
    source = write_tagged_video(tmp_path / "rgb.mp4", moving_frames(5), codec="libx264rgb", pix_fmt="bgr24")
    with av.open(str(source)) as container:
        assert container.streams.video[0].codec_context.colorspace == 0  # RGB: no YUV matrix to blend in
    assert run("--checkpoint", checkpoint, "--input", source, "--output", tmp_path / "out") == 0
    with av.open(str(tmp_path / "out" / "rgb_overlay.mp4")) as written:
        context = written.streams.video[0].codec_context
        assert (context.colorspace, context.color_range) == (6, 2)  # BT.601, the source's full range
    assert_overlay_shows_each_frame(tmp_path / "out" / "rgb_overlay.mp4", source, checkpoint)


def test_joined_recordings_whose_colour_tags_change_are_converted_to_the_first_ones(tmp_path, checkpoint):
    untagged = write_tagged_video(tmp_path / "a.ts", moving_frames(5))
    full_bt709 = write_tagged_video(tmp_path / "b.ts", moving_frames(5, seed=1), matrix=1, color_range=2)
    joined = tmp_path / "videos" / "joined.ts"
    joined.parent.mkdir()
    joined.write_bytes(untagged.read_bytes() + full_bt709.read_bytes())
    assert run("--checkpoint", checkpoint, "--input", joined, "--output", tmp_path / "out") == 0
    with av.open(str(tmp_path / "out" / "joined_overlay.mp4")) as written:
        assert written.streams.video[0].codec_context.color_range != 2
    assert_overlay_shows_each_frame(tmp_path / "out" / "joined_overlay.mp4", joined, checkpoint)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_confidence_maps_of_photos_are_the_top_probability_the_api_returns(tmp_path, checkpoint, monkeypatch, tta):
    photos, output = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for name, (height, width) in {"a.png": (40, 64), "b.jpg": (33, 17), "wide.png": (30, 700)}.items():
        Image.fromarray(noise(rng, height, width)).save(photos / name)
    monkeypatch.setattr(unet, "UPSAMPLE_BYTES", 3 * 4 * 30 * 700)  # upsampled 3 classes at a time
    assert run("--checkpoint", checkpoint, "--input", photos, "--output", output, "--save_confidence",
               "--tta", tta) == 0
    segmenter = inference.Segmenter(checkpoint, device="cpu", tta=tta)
    for name in ("a", "b", "wide"):
        path = next(photos.glob(f"{name}.*"))
        mask, probabilities, confidence = segmenter(path, probabilities=True, confidence=True)
        np.testing.assert_allclose(confidence, probabilities.max(0), atol=1e-5)
        assert (np.take_along_axis(probabilities, mask[None].astype(np.int64), 0)[0] == probabilities.max(0)).all()
        gray = np.array(Image.open(output / f"{name}_confidence.png"))
        assert gray.dtype == np.uint8 and gray.shape == mask.shape
        np.testing.assert_array_equal(gray, np.round(confidence * 255).astype(np.uint8))
        assert gray.min() >= 255 // segmenter.class_table.num_classes


def test_a_folder_may_mix_photos_and_videos(tmp_path, checkpoint, capsys):
    inputs, output = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    Image.fromarray(noise(np.random.default_rng(2), 40, 64)).save(inputs / "photo.png")
    write_video(inputs / "clip.webm", moving_frames(5), container_format="matroska")
    (inputs / "notes.txt").write_text("not an input")
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output) == 0
    assert "2 written, 0 skipped, 1 not an image (notes.txt)" in capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == [
        "clip_overlay.mp4", "photo_color.png", "photo_mask.png", "photo_overlay.jpg"]
    assert len(decoded_frames(output / "clip_overlay.mp4")) == 5


def test_camcorder_and_phone_suffixes_are_videos_and_non_square_pixels_keep_their_shape(tmp_path, checkpoint,
                                                                                       capsys):
    inputs, output = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    write_video(inputs / "camcorder.m2ts", moving_frames(4), container_format="mpegts")
    write_video(inputs / "phone.3gp", moving_frames(3), container_format="3gp")
    write_video(inputs / "anamorphic.mkv", moving_frames(2), sample_aspect_ratio=Fraction(4, 3))  # shown wider
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output) == 0
    assert "3 written, 0 skipped" in capsys.readouterr().out
    assert [len(decoded_frames(output / f"{name}_overlay.mp4")) for name in ("camcorder", "phone", "anamorphic")] == [
        4, 3, 2]
    with av.open(str(output / "anamorphic_overlay.mp4")) as anamorphic, \
            av.open(str(output / "phone_overlay.mp4")) as phone:
        assert anamorphic.streams.video[0].codec_context.sample_aspect_ratio == Fraction(4, 3)
        assert phone.streams.video[0].codec_context.sample_aspect_ratio in (None, Fraction(0, 1), Fraction(1, 1))


def test_skip_existing_remakes_an_overlay_it_cannot_read_and_drops_a_superseded_partial(tmp_path, checkpoint,
                                                                                       capsys):
    inputs, output = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    write_video(inputs / "a.mkv", moving_frames(5), container_format="matroska")
    write_video(inputs / "b.mkv", moving_frames(6), container_format="matroska")
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output, "--frames") == 0
    (output / "a_overlay.mp4").write_bytes(b"")  # damaged or replaced since
    (output / "b_overlay.partial.mp4").write_bytes(b"left by an interrupted run after b was complete")
    capsys.readouterr()
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output, "--frames", "--skip_existing") == 0
    captured = capsys.readouterr()
    assert "1 written, 0 skipped, 1 already done" in captured.out and captured.err == ""
    assert len(decoded_frames(output / "a_overlay.mp4")) == 5
    assert sorted(path.name for path in output.iterdir()) == ["a", "a_overlay.mp4", "b", "b_overlay.mp4"]


def test_a_photo_beside_a_video_of_the_same_name_leaves_the_videos_output_names_as_they_were(tmp_path, checkpoint,
                                                                                              capsys):
    inputs, output = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    write_video(inputs / "a.mkv", moving_frames(3), container_format="matroska")
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output, "--frames") == 0
    Image.fromarray(noise(np.random.default_rng(3), 40, 64)).save(inputs / "a.png")
    capsys.readouterr()
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output, "--frames", "--skip_existing") == 0
    assert "1 written, 0 skipped, 1 already done" in capsys.readouterr().out
    assert sorted(path.name for path in output.iterdir()) == [
        "a", "a_color.png", "a_mask.png", "a_overlay.jpg", "a_overlay.mp4"]


def test_a_shorter_video_of_the_same_name_leaves_no_frame_files_of_the_longer_one(tmp_path, checkpoint):
    source, output = tmp_path / "drive.mkv", tmp_path / "out"
    write_video(source, moving_frames(12), container_format="matroska")
    assert run("--checkpoint", checkpoint, "--input", source, "--output", output, "--frames",
               "--save_confidence") == 0
    (output / "drive" / "notes.txt").write_text("the user's")
    write_video(source, moving_frames(3), container_format="matroska")  # re-cut
    assert run("--checkpoint", checkpoint, "--input", source, "--output", output, "--frames",
               "--save_confidence") == 0
    assert sorted(path.name for path in (output / "drive").iterdir()) == [
        f"{index:06d}_{kind}.png" for index in range(3) for kind in ("confidence", "mask")] + ["notes.txt"]


def test_without_pyav_a_video_is_one_line_saying_what_to_install_and_photos_still_work(tmp_path, checkpoint,
                                                                                         monkeypatch, capsys):
    inputs, output = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    Image.fromarray(noise(np.random.default_rng(3), 40, 64)).save(inputs / "photo.png")
    write_video(inputs / "drive.mp4", moving_frames(3))
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av" or name.startswith("av."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"warning: skipped {inputs / 'drive.mp4'}: video input needs PyAV: pip install " \
                                   f"-r requirements-video.txt"
    assert sorted(path.name for path in output.iterdir()) == ["photo_color.png", "photo_mask.png", "photo_overlay.jpg"]


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_damaged_and_unreadable_videos_get_one_line_each_and_the_rest_is_written(tmp_path, checkpoint, capsys):
    inputs, output = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    frames = noisy_frames(40)
    cut_in_half(write_video(inputs / "matroska.mkv", frames, container_format="matroska"))
    cut_in_half(write_video(inputs / "transport.ts", frames, container_format="mpegts"))
    cut_in_half(write_video(inputs / "lost_index.mp4", frames))
    (inputs / "empty.mov").write_bytes(b"")
    (inputs / "text.avi").write_text("this is not a video")
    with av.open(str(inputs / "sound.mkv"), "w") as sound:  # an audio stream only
        stream = sound.add_stream("mp2", rate=44100)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
        samples.sample_rate = 44100
        sound.mux(stream.encode(samples))
        sound.mux(stream.encode())
    write_video(inputs / "good.mkv", frames[:6])
    before = file_hashes(inputs)
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output, "--batch_size", 4) == 1
    assert file_hashes(inputs) == before
    captured = capsys.readouterr()
    warnings = captured.err.strip().split("\n")
    assert len(warnings) == 6 and all(line.startswith("warning: ") for line in warnings)
    line = {name: next(line for line in warnings if name in line) for name in
            ("matroska.mkv", "transport.ts", "lost_index.mp4", "empty.mov", "text.avi", "sound.mkv")}
    assert "empty file" in line["empty.mov"] and "no video stream" in line["sound.mkv"]
    for name in ("lost_index.mp4", "text.avi", "empty.mov", "sound.mkv"):
        assert line[name].startswith(f"warning: skipped {inputs / name}: ")
        assert not (output / f"{Path(name).stem}_overlay.mp4").exists()
    for name in ("matroska.mkv", "transport.ts"):  # the frames before the damage are kept, in a playable overlay
        assert line[name].startswith(f"warning: {inputs / name}: decoding stopped at frame ")
        kept = int(line[name].split("decoding stopped at frame ")[1].split()[0])
        assert 5 <= kept < 20 and len(decoded_frames(output / f"{Path(name).stem}_overlay.mp4")) == kept
    assert len(decoded_frames(output / "good_overlay.mp4")) == 6
    assert "3 written (2 incomplete), 4 skipped" in captured.out
    assert not [path for path in output.rglob("*") if path.name.startswith(".")]


def test_skip_existing_keeps_a_damaged_videos_overlay_of_the_frames_before_the_damage(tmp_path, checkpoint, capsys):
    """The overlay of a damaged video holds every frame that can be decoded, so a rerun after an interrupted job
    leaves it (and its frames' masks) as they are and writes only what is missing."""
    inputs, output = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    cut_in_half(write_video(inputs / "damaged.mkv", noisy_frames(40), container_format="matroska"))
    Image.fromarray(noise(np.random.default_rng(1), 40, 64)).save(inputs / "photo.png")
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output, "--frames") == 1
    kept = len(decoded_frames(output / "damaged_overlay.mp4"))
    assert 5 <= kept < 20 and len(list((output / "damaged").glob("*_mask.png"))) == kept
    before = {name: (digest, (output / name).stat().st_mtime_ns) for name, digest in file_hashes(output).items()}
    (output / "photo_mask.png").unlink()  # as if the job had been killed before the photo's last file
    capsys.readouterr()
    assert run("--checkpoint", checkpoint, "--input", inputs, "--output", output, "--frames", "--skip_existing") == 0
    assert "1 written, 0 skipped, 1 already done" in capsys.readouterr().out
    after = {name: (digest, (output / name).stat().st_mtime_ns) for name, digest in file_hashes(output).items()}
    assert after.keys() == before.keys()
    assert all(after[name] == before[name] for name in after if not name.startswith("photo_"))
    assert after["photo_mask.png"][0] == before["photo_mask.png"][0]


def test_a_frame_size_that_changes_mid_stream_keeps_the_first_size_and_every_frame(tmp_path, checkpoint, capsys):
    """A recording whose resolution changes part way (two transport streams joined, as a recorder's segments
    are): the overlay keeps the first frame's size, every frame is in it in order, and each later frame is
    segmented as a photo of it scaled to that size."""
    first = write_video(tmp_path / "first.ts", moving_frames(10), container_format="mpegts")
    second = write_video(tmp_path / "second.ts", moving_frames(12, 96, 128, seed=1), container_format="mpegts")
    joined = tmp_path / "inputs" / "joined.ts"
    joined.parent.mkdir()
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    output = tmp_path / "out"
    assert run("--checkpoint", checkpoint, "--input", joined, "--output", output, "--frames") == 0
    assert "warning" not in capsys.readouterr().err
    with av.open(str(joined)) as container:
        frames = [frame.reformat(64, 48, format="rgb24").to_ndarray() for frame in container.decode(video=0)]
    overlays = decoded_frames(output / "joined_overlay.mp4")
    assert len(frames) == len(overlays) == 22 and {overlay.shape for overlay in overlays} == {(48, 64, 3)}
    segmenter = inference.Segmenter(checkpoint, device="cpu")
    for index, frame in enumerate(frames):
        np.testing.assert_array_equal(np.array(Image.open(output / "joined" / f"{index:06d}_mask.png")),
                                      segmenter(frame))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_video_is_one_line(tmp_path, checkpoint, capsys):
    path = write_video(tmp_path / "locked.mp4", moving_frames(3))
    path.chmod(0)
    assert run("--checkpoint", checkpoint, "--input", path, "--output", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip() == f"warning: skipped {path}: cannot read it as a video (Permission denied)"


def test_a_stream_cut_at_its_start_is_segmented_from_its_first_whole_frame(tmp_path, checkpoint, capsys):
    """A transport stream cut at a packet boundary part way (as a recorder's segment): FFmpeg reports the missing
    headers while it probes; every frame it then decodes is segmented, and nothing is reported."""
    whole = write_video(tmp_path / "whole.ts", noisy_frames(60), container_format="mpegts", options={"g": "20"})
    data = whole.read_bytes()
    late = tmp_path / "late" / "late_start.ts"
    late.parent.mkdir()
    late.write_bytes(data[len(data) // 4 // 188 * 188:])
    assert run("--checkpoint", checkpoint, "--input", late, "--output", tmp_path / "out") == 0
    assert "warning" not in capsys.readouterr().err
    with av.open(str(late)) as container:
        decodable = sum(1 for _ in container.decode(video=0))
    assert 20 < decodable < 60 and len(decoded_frames(tmp_path / "out" / "late_start_overlay.mp4")) == decodable


def test_a_video_ffmpeg_may_not_open_is_one_line(tmp_path, checkpoint, monkeypatch, capsys):
    """As root (where permissions do not stop reading) FFmpeg's refusal is simulated: av.open raises what it
    raises for a file without read permission."""
    path = write_video(tmp_path / "locked.mp4", moving_frames(3))
    real_open = av.open

    def refuse(file, mode="r", **options):
        if mode == "r" and str(file) == str(path):
            raise av.error.PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, **options)

    monkeypatch.setattr(av, "open", refuse)
    assert run("--checkpoint", checkpoint, "--input", path, "--output", tmp_path / "out") == 1
    assert capsys.readouterr().err.strip() == f"warning: skipped {path}: cannot read it as a video (Permission denied)"


def test_smoothing_averages_the_class_probabilities_of_the_last_frames(tmp_path, checkpoint):
    source = write_video(tmp_path / "drive.mkv", moving_frames(9))
    assert run("--checkpoint", checkpoint, "--input", source, "--output", tmp_path / "out", "--frames",
               "--smooth", 3, "--batch_size", 2) == 0
    segmenter = inference.Segmenter(checkpoint, device="cpu")
    probabilities = [segmenter.scores(segmenter.model_input(frame)[None])[0].softmax(0)
                     for frame in decoded_frames(source)]
    for index in range(9):
        window = probabilities[max(0, index - 2): index + 1]
        expected = unet.upsample_argmax(sum(window) / len(window), (48, 64)).byte().numpy()
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out" / "drive" / f"{index:06d}_mask.png")),
                                      expected)


def test_ctrl_c_during_a_video_keeps_a_playable_partial_overlay_and_a_rerun_finishes_it(tmp_path, checkpoint,
                                                                                         monkeypatch, capsys,
                                                                                         two_threads):
    source = write_video(tmp_path / "drive.mkv", moving_frames(30))
    output = tmp_path / "out"
    real_scores = inference.Segmenter.scores
    inputs_of = [inference.Segmenter(checkpoint, device="cpu").model_input(frame) for frame in decoded_frames(source)]

    def interrupted_at_the_ninth_frame(self, inputs):  # the third batch, or the part of it a model worker runs
        first = next((index for index, frame in enumerate(inputs_of) if torch.equal(frame, inputs[0])), None)
        assert first is not None, "a batch that starts with no frame of the video"
        if first <= 8 < first + len(inputs):
            raise KeyboardInterrupt
        return real_scores(self, inputs)

    monkeypatch.setattr(inference.Segmenter, "scores", interrupted_at_the_ninth_frame)
    assert run("--checkpoint", checkpoint, "--input", source, "--output", output, "--batch_size", 4) == 130
    partial = output / "drive_overlay.partial.mp4"
    assert capsys.readouterr().err.strip() == (f"interrupted: {source}: the 8 frames segmented so far are in {partial} "
                                               f"(playable; run again to finish it)")
    assert len(decoded_frames(partial)) == 8
    assert sorted(path.name for path in output.iterdir()) == ["drive_overlay.partial.mp4"]
    assert threads_of_a_new_thread() == 2  # the workers' count did not outlive the interruption
    monkeypatch.setattr(inference.Segmenter, "scores", real_scores)
    assert run("--checkpoint", checkpoint, "--input", source, "--output", output, "--skip_existing") == 0
    assert sorted(path.name for path in output.iterdir()) == ["drive_overlay.mp4"]
    assert len(decoded_frames(output / "drive_overlay.mp4")) == 30


@pytest.fixture
def python_ctrl_c():
    """Ctrl-C raising KeyboardInterrupt, as in a terminal, also where the suite runs as a job with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_while_closing_is_ignored_and_every_frame_counted_has_its_mask(tmp_path, checkpoint,
                                                                                      monkeypatch, capfd,
                                                                                      two_threads, python_ctrl_c):
    source = write_video(tmp_path / "drive.mkv", moving_frames(30))
    output = tmp_path / "out"
    real_scores = inference.Segmenter.scores
    calls = []

    def interrupted_twice_at_the_third_call(self, inputs):
        calls.append(len(inputs))
        if len(calls) == 3:  # half of the second batch: once the first batch's 4 frames are through
            deadline = time.monotonic() + 30
            while len(list((output / "drive").glob("*_mask.png"))) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            main = threading.main_thread().ident  # to the main thread: one waiting on a lock would miss it
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.5)  # the main thread is closing up by now, waiting for this worker's part
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.2)
        return real_scores(self, inputs)

    monkeypatch.setattr(inference.Segmenter, "scores", interrupted_twice_at_the_third_call)
    assert run("--checkpoint", checkpoint, "--input", source, "--output", output, "--batch_size", 4,
               "--frames") == 130
    errors = capfd.readouterr().err.strip().splitlines()
    assert "still closing the files being written; signal again to stop at once" in errors
    partial = output / "drive_overlay.partial.mp4"
    assert errors[-1].startswith(f"interrupted: {source}: the ") and errors[-1].endswith(f"are in {partial} "
                                                                                       "(playable; run again to "
                                                                                       "finish it)")
    assert errors[-1].split(": ")[2].startswith("the 4 frames") and len(decoded_frames(partial)) == 4
    assert sorted(path.name for path in (output / "drive").iterdir()) == [f"{index:06d}_mask.png"
                                                                         for index in range(4)]


def test_a_third_signal_stops_at_once(monkeypatch, capfd, python_ctrl_c):
    exits = []
    monkeypatch.setattr(inference.os, "_exit", exits.append)
    with inference.interrupted_once():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
    assert exits == [143]  # 128 + SIGTERM
    assert capfd.readouterr().err.splitlines()[-2:] == [
        "still closing the files being written; signal again to stop at once",
        "stopped at once: unfinished files are left under temporary names (.NAME...), removed by the next run"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def command(checkpoint, inputs, output, *extra):
    return [sys.executable, str(REPO / "inference.py"), "--checkpoint", str(checkpoint), "--input", str(inputs),
            "--output", str(output), "--device", "cpu", "--num_workers", "0", "--batch_size", "1",
            "--writer_threads", "1", "--save_confidence", "--frames", *extra]


def test_a_run_killed_part_way_and_started_again_with_skip_existing_ends_with_the_files_of_one_run(tmp_path,
                                                                                                    checkpoint):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(4)
    for index in range(60):
        Image.fromarray(noise(rng, 40, 64)).save(inputs / f"photo{index:02d}.png")
    for index in range(2):
        write_video(inputs / f"drive{index}.mkv", moving_frames(60, seed=index))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(command(checkpoint, inputs, whole), check=True, capture_output=True, env=environment)
    process = subprocess.Popen(command(checkpoint, inputs, killed), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=environment)
    while process.poll() is None and len(list(killed.glob("*_overlay.jpg"))) < 20:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < len(list(killed.glob("*_overlay.jpg"))) < 60, "the run was not killed part way"
    leftovers = [path for path in killed.iterdir() if path.name.startswith(".")]
    written = [path for path in killed.iterdir() if not path.name.startswith(".")]
    for path in written:  # whole files only (a half-written one would fail to decode)
        if path.suffix in (".png", ".jpg"):
            read_photo(path)
    # started again, and killed again part way through the first video
    process = subprocess.Popen(command(checkpoint, inputs, killed, "--skip_existing"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=environment)
    while process.poll() is None and len(list(killed.glob("drive0/*_mask.png"))) < 40:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "drive0_overlay.mp4").exists() and len(list(killed.glob("*_overlay.jpg"))) == 60
    leftovers += [path for path in killed.rglob(".*")]
    # the video being written (x264 holds its first frames back, so the file appears a few frames late)
    assert any(path.name.startswith(".drive0_overlay.mp4.") for path in leftovers)
    result = subprocess.run(command(checkpoint, inputs, killed, "--skip_existing"), capture_output=True, text=True,
                            env=environment)
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stdout
    assert not any(path.exists() for path in leftovers)
    assert file_hashes(killed).keys() == file_hashes(whole).keys()
    for name, digest in file_hashes(whole).items():
        if name.endswith(".mp4"):
            assert len(decoded_frames(killed / name)) == 60
        else:
            assert file_hashes(killed)[name] == digest, name


def test_sigterm_during_a_video_closes_the_overlay_so_far(tmp_path, checkpoint):
    source = write_video(tmp_path / "long.mkv", moving_frames(400, 96, 128))
    output = tmp_path / "out"
    process = subprocess.Popen(command(checkpoint, source, output), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    while process.poll() is None and len(list((output / "long").glob("*_mask.png"))) < 10:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 130
    partial = output / "long_overlay.partial.mp4"
    assert errors.strip().splitlines()[-1].startswith(f"interrupted: {source}: the ")
    count = int(errors.strip().splitlines()[-1].split("the ")[1].split()[0])
    assert 10 <= count < 400 and len(decoded_frames(partial)) == count
    assert not (output / "long_overlay.mp4").exists()
