"""Enrollment on held-out people: an enrolled dub against the generic path and a photo, in one run.

    python -m benchmarks.enroll [--test-seconds 8] [--people CNN-anchor,french,...] [--methods enrolled,generic,...]
                                [--renderer retrieval|warp|diffusion] [--models FOLDER] [--keep FOLDER]

For each validation person with a talking clip (never seen in training; `training.split`), the first
60% of the clip is enrolled (`avatar enroll`: mouth bank, idle loop, motion adaptation) and the
following stretch of the last 40% (at most `--test-seconds`) is the test. The test picture is played
backwards, so its own mouth has nothing to do with the speech, and dubbed with the test's own speech
(forward); each result is compared with the real test clip by `avatar eval`. Methods:
- enrolled: `dub --avatar` with the avatar enrolled on the first 60% (other footage of the person);
- bank_only / adaptation_only: the same avatar without its motion adaptation / without its mouth bank;
- generic: `dub --no-enroll` (one open mouth, the general motion model);
- self_enrolled: `dub` as it runs by default (the backwards test clip enrolled on the fly);
- photo_only: `animate` of the enrollment part's first frame;
- mismatched: `dub --avatar` with another person's speech (must stay near r = 0).
Beside `avatar eval`'s figures, the teeth's height stability: over the frames whose mouth is open,
the coefficient of variation of the teeth rows' height (bright pixels between the inner lips, in
the middle third of the mouth), next to the real clip's (stretched teeth follow the opening: higher).
Also the enrollment's time and the avatar's size, and both for 60 s of the longest clip.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile
import time

import cv2
import numpy as np

from avatar import media
from avatar.config import AlignConfig, DubConfig, PipelineConfig
from avatar.enroll import save_avatar
from avatar.evaluate import evaluate_pair
from avatar.face.video import align_video
from avatar.face import landmarks as lm
from avatar.pipeline import AvatarPipeline
from avatar.render.warp import inner_lip_curves
from benchmarks.artifacts import bright_rows
from benchmarks.sync import talking_clips
from training.split import VALIDATION_IDENTITIES

METHODS = ("enrolled", "bank_only", "adaptation_only", "generic", "self_enrolled", "photo_only", "mismatched")
KEYS = ("mouth_opening_r", "lips_distance_pct_iod", "mouth_distance_in_head_pct_iod", "sharpness_ratio", "identity_distance", "flicker_ratio",
        "teeth_height_cv")
MIN_SECONDS = 6.0
TEETH_CROP = 384
OPEN_PCT_IOD = 6.0  # frames whose inner-lip gap is at least this (% of the eye distance) count as open


def teeth_height_cv(path: pathlib.Path) -> float:
    """Coefficient of variation of the teeth rows' height over a video's open-mouth frames (aligned at
    TEETH_CROP², where a 512² clip's teeth are several pixels high); NaN with fewer than 5 open frames
    or no teeth showing."""
    images, curves = [], []
    for item in align_video(media.iter_video_frames(path), align_config=AlignConfig(crop_size=TEETH_CROP)):
        if not item.valid:
            continue
        points = item.aligned.landmarks
        mouth = points[lm.MOUTH_AND_JAW, :2]
        if lm.inner_gap(mouth) / lm.interocular(points) * 100 >= OPEN_PCT_IOD:
            images.append(item.aligned.crop)
            curves.append(inner_lip_curves(mouth))
    if len(images) < 5:
        return float("nan")
    interior = np.concatenate([cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[int(u[:, 1].min()):int(np.ceil(l[:, 1].max())) + 1,
                                                                     int(u[0, 0]):int(u[-1, 0]) + 1].ravel()
                               for image, (u, l) in zip(images, curves)])
    threshold = 0.5 * (np.percentile(interior, 90) + np.percentile(interior, 10))
    heights = np.array([bright_rows(image, u, l, threshold, not_red=False) for image, (u, l) in zip(images, curves)])
    return float(heights.std() / heights.mean()) if heights.mean() >= 1.0 else float("nan")


def split_clip(path: pathlib.Path, folder: pathlib.Path, k: int, test_seconds: float):
    """The first 60% (with its audio) → enroll{k}.mp4; the test stretch → real{k}.mp4 (with audio),
    backwards{k}.mp4 (no audio); its speech; the enrollment's first frame → photo{k}.png."""
    info = media.probe(path)
    audio = media.read_audio(path)
    times = [t for t, _ in media.iter_video_frames(path)]
    n = len(times)
    cut = int(0.6 * n)
    fps = info.fps or 25.0
    n_test = min(n - cut, int(round(test_seconds * fps)))
    rate = 16000
    first_part = audio[: int(cut / fps * rate)]
    test_audio = audio[int(cut / fps * rate): int((cut + n_test) / fps * rate)]
    test_frames = []
    with media.VideoWriter(folder / f"enroll{k}.mp4", fps, first_part, rate, crf=14) as writer:
        for i, (_, frame) in enumerate(media.iter_video_frames(path)):
            if i == 0:
                cv2.imwrite(str(folder / f"photo{k}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            if i < cut:
                writer.write(frame)
            elif i < cut + n_test:
                test_frames.append(frame)
            else:
                break
    media.write_video(folder / f"real{k}.mp4", test_frames, fps, test_audio, crf=12)
    media.write_video(folder / f"backwards{k}.mp4", test_frames[::-1], fps, crf=12)
    return cut / fps, test_audio


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-seconds", type=float, default=8.0)
    parser.add_argument("--people", help="comma-separated person keys (default: every held-out person with ≥ 6 s)")
    parser.add_argument("--methods", help=f"comma-separated methods (default: all of {','.join(METHODS)})")
    parser.add_argument("--renderer", default=PipelineConfig.renderer, help="the renderer every method uses (default: %(default)s)")
    parser.add_argument("--models", type=pathlib.Path)
    parser.add_argument("--keep", type=pathlib.Path, help="write the clips, avatars and dubs here (to look at them) instead of a temporary folder")
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(",")) if args.methods else METHODS
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    pipeline = AvatarPipeline.from_pretrained(args.models, config=PipelineConfig(drift=False, renderer=args.renderer))
    clips = talking_clips(len(VALIDATION_IDENTITIES), MIN_SECONDS)
    if args.people:
        wanted = args.people.split(",")
        clips = [c for c in clips if c[0] in wanted]
    results = {m: [] for m in methods}
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or pathlib.Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        speech, avatars = {}, {}
        for k, (person, path) in enumerate(clips):
            enrolled_s, speech[k] = split_clip(path, folder, k, args.test_seconds)
            media.write_audio(folder / f"speech{k}.wav", speech[k])
            started = time.perf_counter()
            avatar = pipeline.enroll([folder / f"enroll{k}.mp4"], progress=False)
            seconds = time.perf_counter() - started
            save_avatar(avatar, folder / f"person{k}.avatar")
            size = (folder / f"person{k}.avatar").stat().st_size
            timings.append((person, enrolled_s, seconds, size, avatar.describe()))
            print(f"{person}: enrolled {enrolled_s:.1f} s in {seconds:.1f} s, {size / 1e6:.1f} MB: {avatar.describe()}", flush=True)
            avatars[k] = avatar
        for k, (person, path) in enumerate(clips):
            avatar = avatars[k]
            other = (k + 1) % len(clips)
            own_wav, other_wav = folder / f"speech{k}.wav", folder / f"speech{other}.wav"
            backwards, real = folder / f"backwards{k}.mp4", folder / f"real{k}.mp4"
            keep = DubConfig(audio_shorter="keep")
            runs = {
                "enrolled": lambda out: pipeline.dub(backwards, own_wav, out, keep, progress=False, avatar=avatar),
                "bank_only": lambda out: pipeline.dub(backwards, own_wav, out, keep, progress=False,
                                                      avatar=dataclasses.replace(avatar, identity=dataclasses.replace(avatar.identity, adaptation=None))),
                "adaptation_only": lambda out: pipeline.dub(backwards, own_wav, out, keep, progress=False,
                                                            avatar=dataclasses.replace(avatar, identity=dataclasses.replace(avatar.identity, bank=None))),
                "generic": lambda out: pipeline.dub(backwards, own_wav, out, keep, progress=False, enroll=False),
                "self_enrolled": lambda out: pipeline.dub(backwards, own_wav, out, keep, progress=False),
                "photo_only": lambda out: pipeline.animate(folder / f"photo{k}.png", own_wav, out, progress=False),
                "mismatched": lambda out: pipeline.dub(backwards, other_wav, out, keep, progress=False, avatar=avatar),
            }
            for method in methods:
                run = runs[method]
                out = folder / f"{method}{k}.mp4"
                run(out)
                row = evaluate_pair(out, real)
                row["teeth_height_cv"] = teeth_height_cv(out)
                results[method].append(row)
            real_cv = teeth_height_cv(real)
            print(f"{person} ({path.name}): " + ", ".join(f"{m} r {results[m][-1]['mouth_opening_r']:.2f} sharpness "
                                                        f"{results[m][-1]['sharpness_ratio']:.2f} teeth cv {results[m][-1]['teeth_height_cv']:.2f}" for m in methods)
                  + f"; real teeth cv {real_cv:.2f}", flush=True)
    print(f"\nheld out: {len(clips)} people; enrolled on the first 60% of each clip, tested on up to {args.test_seconds:g} s of "
          f"the rest (picture backwards, own speech), re-tracked (avatar eval); renderer {args.renderer}")
    print(f"{'':<16}" + "".join(f"{k.split('_pct')[0]:>22}" for k in KEYS))
    for method in methods:
        print(f"{method:<16}" + "".join(f"{np.nanmean([r[k] for r in results[method]]):>22.3f}" for k in KEYS))
    print("\nenrollment: " + "; ".join(f"{p} {s:.0f} s of video in {t:.1f} s, {b / 1e6:.1f} MB" for p, s, t, b, _ in timings))
    longest = max(talking_clips(len(VALIDATION_IDENTITIES), MIN_SECONDS), key=lambda clip: media.probe(clip[1]).duration or 0)
    with tempfile.TemporaryDirectory() as tmp:
        minute = pathlib.Path(tmp) / "minute.mp4"
        clip = media.read_video(longest[1], max_frames=int(60 * (media.probe(longest[1]).fps or 25)))
        media.write_video(minute, clip.frames, clip.fps, clip.audio[: int(len(clip.frames) / clip.fps * 16000)], crf=14)
        started = time.perf_counter()
        pipeline.enroll([minute], output=pathlib.Path(tmp) / "minute.avatar", progress=False)
        seconds = time.perf_counter() - started
        size = (pathlib.Path(tmp) / "minute.avatar").stat().st_size
    print(f"60 s of {longest[0]} ({len(clip.frames) / clip.fps:.0f} s, {clip.frames.shape[2]}x{clip.frames.shape[1]}): "
          f"enrolled in {seconds:.1f} s, avatar {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
