"""Held-out lip sync of the whole engine, measured by `avatar eval`, next to baselines in the same run.

    python -m benchmarks.sync [--clips 6] [--seconds 4] [--renderer retrieval|warp|diffusion] [--diffusion-start 0.25] [--models FOLDER]

For talking clips of validation people (never seen in training; `training.split`), the first
`--seconds` are dubbed three ways and each result is compared with the real clip. The picture that
is dubbed is the same clip played backwards, so its own mouth motion has nothing to do with the
speech: a renderer that left some of the original mouth showing would otherwise score well for the
wrong reason. Methods:
- model: the clip's own speech;
- rest pose: silence of the same length (the mouth stays at the person's rest shape);
- mismatched speech: another validation clip's speech.
And a photo animated (`avatar animate`): the clip's first frame with its own speech (photo) and with
the other clip's (photo, mismatched), compared with the real clip at 25 fps (its nearest frames).
Each opening r is measured twice: by the engine's own tracker (mediapipe's mesh, as `avatar eval`)
and by an independent one (dlib's 68 points, `avatar eval --second-tracker`), so that a mouth only
the engine's tracker reads does not score.
Lower mouth landmark distance and higher opening correlation are better; the model must beat both
baselines to be worth anything. The dubbed picture's head turns as the backwards clip's does, the real
clip's the other way: `mouth_distance_in_head` (each frame's head pose taken out) compares the mouths
alone, where the distance in the picture also counts the heads' different poses. The source leak is
the model dub's opening correlation with the backwards picture it was drawn on, with the real clip's
held fixed (a partial correlation): the speech has nothing to do with that picture's mouth, so what
remains is the original mouth showing through. Closures (`closures`): of the real clip's closed
frames, the share the dub draws closed too, and of its clearly open frames, the share it draws
closed, for the model's dub and the mismatched one (a mouth that never closes scores 0 and 0; one
always closed 1 and 1).
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import tempfile

import cv2
import numpy as np

from avatar import media
from avatar.config import DubConfig, PipelineConfig
from avatar.evaluate import evaluate_pair, second_tracker_openings, track_video
from avatar.face.dlib_shape import DlibMouthTracker
from avatar.face import landmarks as lm
from avatar.metrics import pearson
from avatar.pipeline import AvatarPipeline
from avatar.render.renderers import RENDERERS
from training.split import VALIDATION_IDENTITIES, person_key

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
METHODS = ("model", "rest_pose", "mismatched_speech", "photo", "photo_mismatched")
KEYS = ("mouth_landmark_distance_pct_iod", "mouth_distance_in_head_pct_iod", "lips_distance_pct_iod", "mouth_opening_r",
        "mouth_opening_r_in_head", "mouth_opening_r_second_tracker", "identity_distance",
        "sharpness_ratio", "flicker_ratio")


def talking_clips(count: int, seconds: float, validation: bool = True):
    """`[(person, path)]`: one talking clip (with audio, at least `seconds` long) per person, of the
    validation people or (`validation` False) of the training people, these spread over the manifest."""
    rows, seen = [], set()
    with open(DATA / "manifest.csv") as f:
        for row in csv.DictReader(f):
            person = person_key(row["identity"], row["file"])
            if row["kind"] == "video" and (person in VALIDATION_IDENTITIES) == validation and person not in seen \
                    and float(row["duration_s"]) >= seconds and row["audio_hz"]:
                seen.add(person)
                rows.append((person, DATA / row["file"]))
    return rows[:count] if validation else rows[::max(1, len(rows) // count)][:count]


def opening(path: pathlib.Path) -> np.ndarray:
    """A video's mouth opening per frame `(T,)`: inner-lip gap over the inter-ocular distance (as `avatar
    eval`'s opening r), NaN where no face was found."""
    points = track_video(path, max_frames=1500).landmarks
    return lm.mouth_opening(points) / lm.interocular(points)


CLOSED, OPEN = 0.02, 0.06  # re-tracked inner-lip gap / inter-ocular distance: closed below, clearly open above


def closures(dub: np.ndarray, real: np.ndarray) -> np.ndarray:
    """Per-frame openings `(T,)` (NaN: no face) → counts `(4,)`: the real clip's closed frames, those
    the dub draws closed too, its clearly open frames, those the dub draws closed (sum over clips,
    then divide)."""
    n = min(len(dub), len(real))
    dub, real = dub[:n], real[:n]
    found = np.isfinite(dub) & np.isfinite(real)
    closed, wide = found & (real < CLOSED), found & (real > OPEN)
    return np.array([closed.sum(), (closed & (dub < CLOSED)).sum(), wide.sum(), (wide & (dub < CLOSED)).sum()], np.float64)


def source_leak(dub: np.ndarray, picture: np.ndarray, real: np.ndarray) -> float:
    """The dub's opening correlation with the picture it was drawn on, the real clip's held fixed (partial
    correlation of the openings `(T,)`, over the frames with a face in all three): the backwards
    picture's mouth is the real one's reversed, which may correlate with the real one by chance, and
    then a faithful dub would correlate with it too."""
    n = min(len(dub), len(picture), len(real))
    dub, picture, real = dub[:n], picture[:n], real[:n]
    both = np.isfinite(dub) & np.isfinite(picture) & np.isfinite(real)
    dr, dp, pr = (pearson(a[both], b[both]) for a, b in ((dub, real), (dub, picture), (picture, real)))
    return (dp - dr * pr) / np.sqrt(max(1e-9, (1 - dr ** 2) * (1 - pr ** 2)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--renderer", choices=RENDERERS, default=PipelineConfig.renderer)
    parser.add_argument("--diffusion-start", type=float, default=PipelineConfig.diffusion_start,
                        help="the diffusion renderer refines the warp's draft noised to this time (1: from pure noise)")
    parser.add_argument("--models", type=pathlib.Path, help="a folder with the model files of AvatarPipeline.from_pretrained (default: assets/)")
    args = parser.parse_args(argv)
    pipeline = AvatarPipeline.from_pretrained(args.models, config=PipelineConfig(drift=False, renderer=args.renderer,
                                                                                 diffusion_start=args.diffusion_start))
    clips = talking_clips(args.clips, args.seconds)
    results = {m: [] for m in METHODS}
    leaks = []  # each model dub's source leak (`source_leak`)
    closure_counts = {"model": np.zeros(4), "mismatched_speech": np.zeros(4)}  # `closures`, summed over clips
    agreement = []  # the two trackers' opening r on each real clip: how far apart they read the same mouth
    second = DlibMouthTracker()
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        speech, openings = {}, {}  # each real clip's speech and re-tracked opening
        for k, (person, path) in enumerate(clips):
            clip = media.read_video(path, max_frames=int(round(args.seconds * (media.probe(path).fps or 25))))
            real = folder / f"real{k}.mp4"
            n_samples = int(len(clip.frames) / clip.fps * 16000)
            media.write_video(real, clip.frames, clip.fps, clip.audio[:n_samples], crf=12)
            media.write_video(folder / f"backwards{k}.mp4", clip.frames[::-1], clip.fps, crf=12)
            at_25 = np.minimum(np.round(np.arange(int(len(clip.frames) * 25 / clip.fps)) * clip.fps / 25).astype(int), len(clip.frames) - 1)
            media.write_video(folder / f"real25_{k}.mp4", clip.frames[at_25], 25.0, crf=12)  # what an animated photo is compared with
            cv2.imwrite(str(folder / f"photo{k}.png"), cv2.cvtColor(clip.frames[0], cv2.COLOR_RGB2BGR))
            speech[k] = media.read_audio(real)[:n_samples]
            openings[k] = theirs = opening(real)
            ours = second_tracker_openings(second, real, len(clip.frames))
            found = np.isfinite(theirs) & np.isfinite(ours)
            agreement.append(pearson(theirs[found], ours[found]))
        for k, (person, path) in enumerate(clips):
            real = folder / f"real{k}.mp4"
            own = speech[k]
            other = speech[(k + 1) % len(clips)]
            other = np.resize(other, own.size)  # repeat or cut to the same length
            asked = openings[k]
            inputs = {"model": own, "rest_pose": np.zeros_like(own), "mismatched_speech": other, "photo": own, "photo_mismatched": other}
            for method, audio in inputs.items():
                wav, out = folder / f"{method}{k}.wav", folder / f"{method}{k}.mp4"
                media.write_audio(wav, audio)
                if method.startswith("photo"):
                    pipeline.animate(folder / f"photo{k}.png", wav, out, progress=False)
                    results[method].append(evaluate_pair(out, folder / f"real25_{k}.mp4", second_tracker=True))
                    continue
                pipeline.dub(folder / f"backwards{k}.mp4", wav, out, DubConfig(audio_shorter="keep"), progress=False)
                results[method].append(evaluate_pair(out, real, second_tracker=True))
                if method in closure_counts:
                    drawn = opening(out)
                    closure_counts[method] += closures(drawn, asked)
                if method == "model":  # the picture it was drawn on: its own mouth must not show through
                    leaks.append(source_leak(drawn, opening(folder / f"backwards{k}.mp4"), asked))
            print(f"{person} ({path.name}): " + ", ".join(
                f"{m} {results[m][-1]['mouth_landmark_distance_pct_iod']:.2f}/{results[m][-1]['mouth_opening_r']:.2f}/"
                f"{results[m][-1]['mouth_opening_r_second_tracker']:.2f}" for m in METHODS)
                + "  (mouth distance %IOD / opening r / opening r by dlib)", flush=True)
    how = f"{args.renderer} renderer" + (f" (from the warp's draft at t={args.diffusion_start:g})" if args.renderer == "diffusion" else "")
    print(f"\nheld out: {len(clips)} people, {args.seconds:g} s each, dubbed with the {how} and re-tracked (avatar eval)")
    print(f"{'':<20}" + "".join(f"{k.split('_pct')[0].replace('second_tracker', 'dlib'):>24}" for k in KEYS))
    for method in METHODS:
        print(f"{method:<20}" + "".join(f"{np.nanmean([r[k] for r in results[method]]):>24.3f}" for k in KEYS))
    print(f"the two trackers on the real clips (mediapipe's mesh against dlib's 68 points): opening r {np.mean(agreement):.3f} "
          f"(per clip {', '.join(f'{r:.2f}' for r in agreement)})")
    print(f"source leak: the dub's mouth opening against the picture's own (0: it does not show through): "
          f"r {np.nanmean(leaks):.3f} (per clip {', '.join(f'{r:.2f}' for r in leaks)})")
    for method, (closed, kept, wide, shut) in closure_counts.items():
        print(f"closures ({method}): the real clip's closed frames (< {CLOSED:g} IOD) drawn closed {kept / max(closed, 1):.0%} "
              f"of {int(closed)}; its clearly open frames (> {OPEN:g}) drawn closed {shut / max(wide, 1):.0%} of {int(wide)}")
    offsets = [r["av_offset_generated"]["ms"] for r in results["model"] if r["av_offset_generated"]]
    if offsets:
        print(f"model A/V offset estimate: median {np.median(offsets):+.0f} ms over {len(offsets)} clips")


if __name__ == "__main__":
    main()
