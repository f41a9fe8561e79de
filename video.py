"""Video files through inference.py: frames are decoded, segmented in batches exactly as photos are, and the
palette over each frame is encoded as H.264, all at once (a decoding thread, the model's workers, a thread that
finishes each frame: upsampling, argmax, overlay, encoding; joined by small queues), so memory stays flat whatever
the video's length. The overlay is blended into the frame's own Y, U and V planes, the form the decoder gives and
the encoder takes, so no frame is converted to RGB and back for it.

    python inference.py --input drive.mp4            # -> OUTPUT/drive_overlay.mp4
    python inference.py --input drive.mp4 --frames   # also OUTPUT/drive/000000_mask.png, ...

PyAV (the av package: FFmpeg with libx264 bundled) is imported only when a video is met, so photos never need it.
"""
import collections
import contextlib
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runtime import Stopped, import_optional, one_line, remove_stale_temp_files, temp_path, write_image_atomically
from unet import mask_and_confidence
from visualize import blend_rows, blend_table

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".m2v",
                  ".vob", ".wmv", ".asf", ".flv", ".f4v", ".3gp", ".3g2", ".ogv", ".mxf", ".dv", ".y4m", ".h264",
                  ".264", ".h265", ".hevc"}
VIDEO_REQUIREMENTS = "requirements-video.txt"
ENCODER_OPTIONS = {"crf": "20", "preset": "superfast"}  # x264: visually clean at 2 cores' speed (docs/video.md)
FALLBACK_RATE = Fraction(30)  # for the rare stream that records no frame rate
# (Kr, Kb) of the YCbCr matrices the overlay is blended in, by FFmpeg's colour space number: BT.709, BT.2020 (non-
# constant luminance); BT.601 for 5, 6 and 2 (untagged, which FFmpeg converts to RGB as BT.601)
LUMA_WEIGHTS = {1: (0.2126, 0.0722), 9: (0.2627, 0.0593)}
BT601 = (0.299, 0.114)
BLENDED_MATRICES = {1, 2, 5, 6, 9}  # other sources (RGB-coded, SMPTE 240M, ...) are converted to SMPTE170M = BT.601
SMPTE170M = 6
FULL_RANGE, LIMITED_RANGE = 2, 1  # FFmpeg's AVCOL_RANGE_JPEG (Y and chroma span 0-255) and _MPEG (16-235, 16-240)


class VideoError(Exception):
    """A video that cannot be (fully) read; the message says why, without the file name. kept_some: the frames
    before the damage were written."""

    def __init__(self, message, kept_some=False):
        super().__init__(message)
        self.kept_some = kept_some


def import_av():
    """The av module, or a UserError saying what to install."""
    av = import_optional("av", "av.logging", needed_for="video input needs PyAV", requirements=VIDEO_REQUIREMENTS)
    av.logging.set_level(av.logging.ERROR)  # decoding damage is reported as ERROR log lines, which we capture
    return av


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def picture_format(width, height):
    """The overlay's pixel format: 4:2:0, what players expect, needs even sides; odd-sized sources keep their size
    in 4:4:4."""
    return "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"


def keep_time(target, source):
    """target, given source's time (pts in its time_base), which the overlay writer keeps; a frame without a time
    base has no time to give."""
    if source.time_base is not None:
        target.pts, target.time_base = source.pts, source.time_base
    return target


def overlay_path(output_dir, name, partial=False):
    return Path(output_dir) / f"{name}_overlay{'.partial' if partial else ''}.mp4"


# ----------------------------------------------------------------------------- reading

def first_error(av, logs, ignore=None):
    """`module: message` of the first ERROR line FFmpeg logged (not counting module `ignore`), or None."""
    line = next((line for line in logs if line[0] <= av.logging.ERROR and line[1] != ignore), None)
    return None if line is None else f"{line[1]}: {line[2].strip()}"


def open_video(av, path):
    """(container, its first video stream, the damage the demuxer reported while reading ahead or None), or
    VideoError saying why the file cannot be read. Opening reads ahead (and decodes a few frames, whose errors the
    reader sees again), so a short truncated file may show its damage here already."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise VideoError("empty file")
    try:
        with av.logging.Capture(local=False) as logs:
            container = av.open(str(path))
    except Exception as error:  # FFmpeg's errors (InvalidDataError, PermissionError, ...) all mean: unreadable
        reason = getattr(error, "strerror", None) or one_line(error)
        raise VideoError(f"cannot read it as a video ({reason})") from None
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    return container, stream, first_error(av, logs, ignore=stream.codec_context.name)


class FrameReader:
    """Decodes a stream's frames in a thread into a small queue, each as (index, the frame as a picture in the
    overlay's pixel format, the model's input made from its RGB), turned upright as players show them (a phone's
    rotation tag, as photos' EXIF orientation), so the model sees streets the right way up.
    Decoding stops at the first damage FFmpeg reports (a truncated or corrupt file); `damage` then says at which
    frame and why, and the frames before it are all delivered. Errors before the first whole frame (a stream cut
    at its start decodes from its first keyframe) drop the frames they come with; `start_error` says why."""

    def __init__(self, av, container, stream, model_input, depth, damage_at_open=None):
        self.av, self.container, self.stream, self.model_input = av, container, stream, model_input
        self.size = stream.codec_context.width, stream.codec_context.height  # every frame gets the first's size
        self.picture_format, self.colour = picture_format(*self.size), None  # colour: the first frame's, see picture()
        # quarter turns counterclockwise to show a frame upright, and the pixels' shape then: the first frame's
        self.turns, self.sample_aspect_ratio = 0, stream.sample_aspect_ratio  # the container's, as players take it
        self.queue, self.stopping, self.damage = queue.Queue(depth), threading.Event(), None
        self.damage_at_open, self.start_error = damage_at_open, None
        self.thread = threading.Thread(target=self._decode, daemon=True)
        self.thread.start()

    def _put(self, item):
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _decode(self):
        index = 0
        try:
            with self.av.logging.Capture(local=False) as logs:
                for packet in self.container.demux(self.stream):
                    decoded, error = self._decode_packet(packet, logs)
                    if error:  # the frames a damaged packet releases may be damaged
                        if index > 0:
                            self.damage = (index, error)
                            return
                        self.start_error = self.start_error or error
                        logs.clear()
                        continue
                    for frame in decoded:
                        if index == 0:
                            self.set_orientation(frame)
                        rgb = np.ascontiguousarray(np.rot90(frame.reformat(*self.size, format="rgb24").to_ndarray(),
                                                            self.turns))
                        picture = keep_time(self.picture(frame, rgb), frame)
                        if not self._put((index, picture, self.model_input(rgb))):
                            return
                        index += 1
            if self.damage_at_open:  # the demuxer gave what it had; the file's end is missing
                self.damage = (index, self.damage_at_open)
        except Exception as error:  # a demuxer or decoder failure part way
            self.damage = (index, one_line(error))
        finally:
            self._put(None)

    def set_orientation(self, frame):
        """Every frame is to be turned as this one's display matrix says (FFmpeg's counterclockwise angle, to the
        nearest quarter turn; a mirroring tag is not applied); on its side, a non-square pixel's shape turns too."""
        self.turns = round((frame.rotation or 0) / 90) % 4
        if self.turns % 2 and self.sample_aspect_ratio:
            self.sample_aspect_ratio = 1 / self.sample_aspect_ratio

    def picture(self, frame, rgb):
        """The frame (whose RGB at the first frame's size, turned upright, is `rgb`) as `rgb` shows it, in the
        overlay's pixel format,
        colour matrix and range: the first frame's, or BT.601 where the palette cannot be blended in its matrix,
        so that every picture of one video has the colour tags the encoder gets from the first. Mostly the decoded
        frame itself; a frame in other colours or turned is made from its (turned) RGB, as FFmpeg shows it."""
        if self.colour is None:
            matrix = frame.colorspace if frame.colorspace in BLENDED_MATRICES else SMPTE170M
            self.colour = matrix, FULL_RANGE if frame.color_range == FULL_RANGE else LIMITED_RANGE
        matrix, color_range = self.colour
        if not self.turns and frame.colorspace == matrix and (frame.color_range == FULL_RANGE) == (
                color_range == FULL_RANGE):
            return frame.reformat(*self.size, format=self.picture_format)
        picture = self.av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            format=self.picture_format, dst_colorspace=matrix, dst_color_range=color_range)
        picture.colorspace, picture.color_range = matrix, color_range
        return picture

    def _decode_packet(self, packet, logs):
        """(frames, None), or (frames, why) when FFmpeg reported damage (an ERROR log line or a failed call)."""
        try:
            decoded = packet.decode()
        except self.av.error.InvalidDataError as error:
            return [], one_line(error)
        return decoded, first_error(self.av, logs)

    def batches(self, size):
        """Lists of up to `size` decoded frames, in order, until the stream ends or decoding stops."""
        batch = []
        while (item := self.queue.get()) is not None:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def stop(self):
        self.stopping.set()
        self.thread.join()


# ----------------------------------------------------------------------------- writing

class OverlayWriter:
    """An H.264 mp4 of the pictures' size (the source's, upright) at the source's rate and times, written under a
    temporary name beside the output and renamed when closed: a killed run never leaves a half-written video under
    an output's name."""

    MAX_GAP_SECONDS = 10  # a longer jump in the source's clock is a break in it (a reset camera, MPEG-TS), not a pause

    def __init__(self, av, path, rate):
        self.av, self.count, self.origin, self.last_tick = av, 0, None, -1  # origin: the source time of frame 0
        self.temp_path = temp_path(path)
        self.container = av.open(str(self.temp_path), "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate, options=ENCODER_OPTIONS)

    def write(self, picture, sample_aspect_ratio=None):
        """Encode one picture. The first sets the stream's size and pixel format, the colour matrix and range its
        Y, U and V values are in (the primaries and transfer stay untagged: the palette is sRGB) and the pixels'
        shape (non-square for anamorphic or DV sources; None: square); the others must match it."""
        context = self.stream.codec_context
        if self.count == 0:
            self.stream.width, self.stream.height, self.stream.pix_fmt = picture.width, picture.height, \
                picture.format.name
            context.colorspace, context.color_range = picture.colorspace, picture.color_range
            if sample_aspect_ratio:
                context.sample_aspect_ratio = sample_aspect_ratio
        rate = Fraction(context.framerate)
        picture.pts, picture.time_base = self.tick(picture, rate), 1 / rate
        self.container.mux(self.stream.encode(picture))
        self.count += 1

    def tick(self, picture, rate):
        """The picture's frame number at `rate`: its source time (picture.pts in picture.time_base) to the nearest
        frame, so a constant rate stays exact and a variable one keeps its pauses. A picture without a time, or
        whose time goes back (joined recordings, a wrapped clock) or jumps, comes next in line, and the times after
        it count from there."""
        time = picture.pts * picture.time_base if picture.pts is not None and picture.time_base else None
        tick = self.last_tick + 1
        if time is not None:
            source_tick = None if self.origin is None else round((time - self.origin) * rate)
            if source_tick is not None and tick <= source_tick <= tick + self.MAX_GAP_SECONDS * rate:
                tick = source_tick
            else:  # the first time, or a break in the source's clock
                self.origin = time - tick / rate
        self.last_tick = tick
        return tick

    def close(self, path):
        """Flush the encoder, close the file (playable) and give it its name."""
        self.container.mux(self.stream.encode())
        self.container.close()
        with open(self.temp_path, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(self.temp_path, path)

    def discard(self):
        try:
            self.container.close()
        except Exception:  # closing after a failure may fail too; the file goes anyway
            pass
        self.temp_path.unlink(missing_ok=True)


def palette_in_yuv(colors, colorspace, color_range) -> np.ndarray:
    """RGB colours -> (C, 3) uint16 Y, U, V in a frame's colour matrix and range, as FFmpeg converts them."""
    kr, kb = LUMA_WEIGHTS.get(colorspace, BT601)
    red, green, blue = (np.asarray(colors, np.float64).reshape(-1, 3) / 255).T
    luma = kr * red + (1 - kr - kb) * green + kb * blue
    blue_difference, red_difference = (blue - luma) / (2 - 2 * kb), (red - luma) / (2 - 2 * kr)
    luma_span, chroma_span, black = (255, 255, 0) if color_range == FULL_RANGE else (219, 224, 16)
    yuv = np.stack([black + luma_span * luma, 128 + chroma_span * blue_difference, 128 + chroma_span * red_difference])
    return yuv.T.round().clip(0, 255).astype(np.uint16)


def plane_pixels(plane) -> np.ndarray:
    """A picture plane's pixels as a (height, width) uint8 view of its buffer (rows may be padded)."""
    rows = np.frombuffer(plane, np.uint8, count=plane.line_size * plane.height).reshape(plane.height, -1)
    return rows[:, :plane.width]


class PictureOverlay:
    """visualize.overlay's blend (the same table, rounding and alpha) done in a picture's own Y, U and V planes,
    with the palette converted to its colour matrix and range: half the values of RGB, and nothing for the encoder
    to convert (timings in docs/video.md). A 4:2:0 chroma sample takes the class of its block's first
    pixel, so a block split between two classes shows one class's hue (its brightness stays per pixel)."""

    def __init__(self, av, colors, alpha):
        self.av, self.colors, self.weight, self.tables = av, colors, int(round(alpha * 256)), {}

    def table(self, colorspace, color_range):
        if (colorspace, color_range) not in self.tables:
            black = palette_in_yuv([(0, 0, 0)], colorspace, color_range)
            palette = palette_in_yuv(self.colors, colorspace, color_range)
            self.tables[colorspace, color_range] = blend_table(palette, self.weight, black)
        return self.tables[colorspace, color_range]

    def __call__(self, picture, mask):
        if picture.format.name not in ("yuv420p", "yuvj420p", "yuv444p", "yuvj444p"):
            raise ValueError(f"PictureOverlay blends 8-bit planar 4:2:0 or 4:4:4 pictures, not {picture.format.name}")
        table = self.table(picture.colorspace, picture.color_range)
        rows = blend_rows(mask, len(self.colors))
        blended = self.av.VideoFrame(picture.width, picture.height, picture.format.name)
        blended.colorspace, blended.color_range = picture.colorspace, picture.color_range
        for channel, (source, target) in enumerate(zip(picture.planes, blended.planes)):
            step = picture.height // source.height  # 2 for 4:2:0's chroma (even sides), else 1
            index = rows[::step, ::step] + channel
            index <<= 8
            index |= plane_pixels(source)
            np.take(table, index, out=plane_pixels(target))
        return keep_time(blended, picture)


class Smoother:
    """--smooth N: each pixel's class probabilities averaged over the last N frames (causal, so it streams), at
    the model's resolution; N = 1 passes the scores through, so frames are segmented exactly as photos are."""

    def __init__(self, frames, scores_are_probabilities):
        self.window = collections.deque(maxlen=frames)
        self.scores_are_probabilities = scores_are_probabilities

    def __call__(self, scores):
        """(scores to upsample, whether they are probabilities)."""
        if self.window.maxlen == 1:
            return scores, self.scores_are_probabilities
        self.window.append(scores if self.scores_are_probabilities else scores.softmax(0))
        return sum(self.window) / len(self.window), True


# ----------------------------------------------------------------------------- one video

def frames_folder(output_dir, name):
    return Path(output_dir) / name


def is_done(av, output_dir, name, args):
    """--skip_existing: the overlay exists (it is renamed into place only when complete) and, with --frames, so
    does every frame's mask (and confidence map)."""
    path = overlay_path(output_dir, name)
    if not path.is_file():
        return False
    if not args.frames:
        return True
    try:
        with av.logging.Capture(local=False), av.open(str(path)) as written:
            count = written.streams.video[0].frames
    except (av.error.FFmpegError, OSError, IndexError):  # not an overlay we wrote (damaged, replaced): make it again
        return False
    kinds = ("mask", "confidence") if args.save_confidence else ("mask",)
    folder = frames_folder(output_dir, name)
    return count > 0 and all((folder / f"{index:06d}_{kind}.png").is_file() for index in range(count) for kind in kinds)


def remove_frame_files_from(folder, count):
    """Remove frame files numbered `count` or more: an earlier run's of a longer video of the same name."""
    for path in folder.glob("*_*.png"):
        number, _, kind = path.stem.partition("_")
        if number.isdigit() and kind in ("mask", "confidence") and int(number) >= count:
            path.unlink()


def write_frame_files(folder, index, mask, confidence, mask_values):
    write_image_atomically(folder / f"{index:06d}_mask.png", mask_values[mask])
    if confidence is not None:
        write_image_atomically(folder / f"{index:06d}_confidence.png", confidence)


@contextlib.contextmanager
def model_workers(segmenter):
    """(pool, workers): the threads that run the model. A PyTorch model on a CPU with two or more threads gets two
    workers with half the threads each (an odd one left to the decoding and finishing threads): while one waits
    at the end of an op for its slowest thread, the other computes (docs/video.md). A GPU or ONNX Runtime gets one.
    On leaving, queued batches are dropped and the caller's thread count, which a worker's also sets as the default
    for threads started later, is restored."""
    threads = torch.get_num_threads()
    split = segmenter.model is not None and segmenter.device.type == "cpu" and threads >= 2
    workers = 2 if split else 1
    pool = ThreadPoolExecutor(workers, initializer=torch.set_num_threads if split else None,
                              initargs=(threads // 2,) if split else ())
    try:
        yield pool, workers
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


def batch_parts(batch, workers):
    """The batch in at most `workers` consecutive parts, one for each worker: together they hold what one batch
    holds, so two workers need no more memory than one."""
    size = -(-len(batch) // workers)
    return [batch[start:start + size] for start in range(0, len(batch), size)]


def segment_frames(reader, writer, segmenter, args, mask_values, folder, progress):
    """The main loop: batches of decoded frames to the model's workers, their scores in order to the finishing
    thread (smoothing, upsampling, overlay, encoding) and frame files to the writing threads, so the model never
    waits for them. At most two batches wait for the model and two for the finishing thread: memory stays flat."""
    smoother = Smoother(args.smooth, segmenter.tta != "none")
    overlay = PictureOverlay(writer.av, segmenter.class_table.colors, args.alpha)
    in_model, pending, file_jobs = collections.deque(), collections.deque(), collections.deque()

    def finish(batch, batch_scores):
        for (index, picture, _), scores in zip(batch, batch_scores):
            scores, probabilities = smoother(scores)
            size = picture.height, picture.width
            mask, confidence = mask_and_confidence(scores, size, probabilities, args.save_confidence)
            writer.write(overlay(picture, mask), reader.sample_aspect_ratio)
            if folder is not None:
                file_jobs.append(files.submit(write_frame_files, folder, index, mask, confidence, mask_values))
                while len(file_jobs) > 4 * args.batch_size:
                    file_jobs.popleft().result()

    def to_finisher(keep):
        """Hands the model's oldest batches, in order, to the finishing thread until `keep` remain with it."""
        while len(in_model) > keep:
            batch, scores = in_model.popleft()
            pending.append(finisher.submit(finish, batch, scores.result()))
            while len(pending) > 2 * workers:
                pending.popleft().result()
            progress.update(len(batch))

    threads = torch.get_num_threads()  # the caller's count, kept by the finishing thread (docs/video.md says why)
    with model_workers(segmenter) as (pool, workers), ThreadPoolExecutor(args.writer_threads) as files, \
            ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,)) as finisher:
        for batch in reader.batches(args.batch_size):
            for part in batch_parts(batch, workers):
                in_model.append((part, pool.submit(segmenter.scores, torch.stack([item[2] for item in part]))))
            to_finisher(keep=workers)
        to_finisher(keep=0)
        for job in pending:
            job.result()
        for job in file_jobs:  # complete: the finishing thread has no batch left
            job.result()


def segment_video(av, path, name, segmenter, args, output_dir, mask_values):
    """Segment one video into OUTPUT/NAME_overlay.mp4 (and with --frames OUTPUT/NAME/*.png). Returns the number of
    frames written; raises VideoError for a file that decodes nothing and for damage part way (the frames before
    it are then kept in the overlay), and Stopped on Ctrl-C (the overlay so far is kept as NAME_overlay.partial.mp4)."""
    container, stream, damage_at_open = open_video(av, path)
    with container:
        stream.thread_type = "SLICE"  # frame threads would log damage frames after it happened
        rate = stream.average_rate or stream.guessed_rate or FALLBACK_RATE
        folder = frames_folder(output_dir, name) if args.frames else None
        if folder is not None:
            folder.mkdir(exist_ok=True)
            remove_stale_temp_files(folder)
        reader = FrameReader(av, container, stream, segmenter.model_input, 2 * args.batch_size, damage_at_open)
        writer = OverlayWriter(av, overlay_path(output_dir, name), rate)
        progress = tqdm(total=stream.frames or None, unit="frame", desc=Path(path).name, dynamic_ncols=True,
                        disable=None)
        try:
            segment_frames(reader, writer, segmenter, args, mask_values, folder, progress)
        except KeyboardInterrupt:
            reader.stop()
            if writer.count == 0:
                writer.discard()
                raise Stopped(f"interrupted: {path}: no frame was segmented yet", 130) from None
            partial = overlay_path(output_dir, name, partial=True)
            writer.close(partial)
            raise Stopped(f"interrupted: {path}: the {writer.count} frames segmented so far are in {partial} "
                          f"(playable; run again to finish it)", 130) from None
        except BaseException:
            reader.stop()
            writer.discard()
            raise
        finally:
            progress.close()
        reader.stop()
        if writer.count == 0:
            writer.discard()
            reason = (reader.damage or (0, reader.start_error or "the video stream holds no frame"))[1]
            raise VideoError(f"no frame could be decoded ({reason})")
        writer.close(overlay_path(output_dir, name))
    overlay_path(output_dir, name, partial=True).unlink(missing_ok=True)
    if folder is not None:
        remove_frame_files_from(folder, writer.count)
    if reader.start_error:
        raise VideoError(f"its start could not be decoded ({reader.start_error}); {writer.count} frames from the first "
                         f"whole one on are in {overlay_path(output_dir, name)}", kept_some=True)
    if reader.damage:
        index, reason = reader.damage
        raise VideoError(f"decoding stopped at frame {index} ({reason}); the {index} frames before it are in "
                         f"{overlay_path(output_dir, name)}", kept_some=True)
    return writer.count
