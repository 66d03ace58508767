"""How faithfully the renderer draws the mouths it is asked for, apart from the motion model.

    python -m benchmarks.fidelity [--clips 16] [--seconds 4] [--people training|validation] [--renderer retrieval]

Each clip's own real mouths (tracked) are the targets; they are drawn, as `avatar dub` draws (the
person enrolled on the fly, each mouth placed at its frame's head pose), on the same clip played
backwards, and the result is re-tracked as `benchmarks.sync` does. A perfect renderer re-tracks as
the real clip. Printed per clip and on average:
- opening r: the re-tracked mouth opening's correlation with the real clip's;
- asked / own: the re-tracked opening regressed on the opening asked for (the real clip's) and on
  the backwards picture's own (a perfect renderer: 1 and 0);
- source leak: the re-tracked opening's partial correlation with the picture's own, the real one
  held fixed (`benchmarks.sync.source_leak`; perfect: 0);
- closed: the mean re-tracked opening over the frames whose real lips are closed (< 0.02 of the
  inter-ocular distance), next to the real one;
- response: over all clips' frames, binned by the real opening asked for (`RESPONSE_BINS`, in % of
  the inter-ocular distance), the mean re-tracked opening of the drawn mouths next to the real one's
  (a perfect renderer: equal in every bin; a dead zone shows as small openings drawn closed);
- no entry: the share of frames with a face for which the person's bank had no mouth near the
  frame's head pose (`MouthBank.candidates`), drawn by the warp alone;
- inside jumps: over all clips' pairs of consecutive frames open in both (re-tracked opening above
  `OPEN`), how much the inside of the mouth (the mean grey level between the re-tracked inner lips)
  changes from one frame to the next, mean and 95th and 99th percentiles, drawn next to real: a
  change of bank entry between a dark mouth and one showing its teeth is seen as a pop, a tail the
  real clip does not have.
Tune renderers on the training people (the default); judge them on the validation people with
`benchmarks.sync`, where the motion model's mouths are drawn.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import typing

import cv2
import numpy as np

from avatar import media
from avatar.config import PipelineConfig
from avatar.enroll import build_avatar, track_video
from avatar.evaluate import track_video as track_for_eval
from avatar.face import landmarks as lm
from avatar.face.align import polygon_mask
from avatar.metrics import pearson
from avatar.pipeline import AvatarPipeline
from avatar.render.renderers import RENDERERS
from benchmarks.sync import CLOSED, OPEN, opening, source_leak, talking_clips

RESPONSE_BINS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.12, 0.2, np.inf)  # real openings (× inter-ocular distance) of the response


def real_mouths(pipeline: AvatarPipeline, real: pathlib.Path, rest: np.ndarray, rest_anchor: np.ndarray) -> np.ndarray:
    """The real clip's mouths as the motion model gives them `(T, 59, 2)`: each frame's lips and jaw
    moved from its mouth anchor to the person's rest anchor (the rest mouth where no face was found)."""
    footage = track_video(pipeline, real, progress=False, with_audio=False)
    try:
        return np.stack([rest if not footage.valid[j] else
                         np.asarray(footage.crop_landmarks[j], np.float64)[lm.MOUTH_AND_JAW, :2]
                         - lm.mouth_anchor(np.asarray(footage.crop_landmarks[j], np.float64)) + rest_anchor
                         for j in range(len(footage.valid))])
    finally:
        footage.close()


def draw_real_mouths(pipeline: AvatarPipeline, real: pathlib.Path, backwards: pathlib.Path, out: pathlib.Path) -> float:
    """`backwards` drawn with `real`'s mouths (the first N frames of each, N the shorter), written to
    `out`; returns the share of its frames with a face that got no bank entry."""
    footage = track_video(pipeline, backwards, progress=False, with_audio=False)
    try:
        identity = build_avatar(pipeline, [footage], progress=False, adapt=False, idle=False, strict=False).identity
        mouths = real_mouths(pipeline, real, identity.rest, identity.rest_anchor)
        n = min(len(mouths), len(footage.valid))
        jobs = list(pipeline.footage_jobs(identity, footage.store.__getitem__, footage.valid, footage.transforms,
                                          footage.crop_landmarks, footage.frame_landmarks, np.arange(n), mouths[:n], footage.fps, []))
        media.write_video(out, list(pipeline.render_jobs(identity, jobs, footage.fps)), footage.fps, crf=12)
        faces = [job for job in jobs if job.mouth is not None]
        return float(np.mean([job.bank_index is None or job.bank_index < 0 for job in faces])) if faces else float("nan")
    finally:
        footage.close()


def opening_and_inside(path: pathlib.Path) -> typing.Tuple[np.ndarray, np.ndarray]:
    """A video's mouth opening per frame `(T,)` (as `benchmarks.sync.opening`) and the mean grey level
    `(T,)` in [0, 255] between its inner lips on the aligned crop (NaN where no face was found or the
    lips enclose no pixel)."""
    tracked = track_for_eval(path, max_frames=1500)
    points = tracked.landmarks
    inside = np.full(len(points), np.nan)
    for t, (crop, face) in enumerate(zip(tracked.crops, points)):
        if np.isfinite(face).all():
            mask = polygon_mask(face[lm.LIPS_INNER], crop.shape[:2])
            if mask.any():
                inside[t] = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)[mask].mean()
    return lm.mouth_opening(points) / lm.interocular(points), inside


def inside_jumps(openings: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """|change of the inside's grey level| `(P,)` between the consecutive frames open in both
    (`opening_and_inside`'s two arrays)."""
    pairs = (openings[1:] > OPEN) & (openings[:-1] > OPEN) & np.isfinite(inside[1:]) & np.isfinite(inside[:-1])
    return np.abs(np.diff(inside))[pairs]


def measure(drawn: np.ndarray, picture: np.ndarray, real: np.ndarray) -> dict:
    """The figures of one clip from per-frame openings `(T,)` (NaN: no face): `drawn` the re-tracked
    output, `picture` the backwards clip it was drawn on, `real` the clip whose mouths were asked for.
    "response" `(3, bins) float64`: per `RESPONSE_BINS` bin of the real opening, its frames and the sums
    of their real and drawn openings (summed over clips, then divided: `format_response`)."""
    n = min(len(drawn), len(picture), len(real))
    drawn, picture, real = drawn[:n], picture[:n], real[:n]
    ok = np.isfinite(drawn) & np.isfinite(picture) & np.isfinite(real)
    weights = np.linalg.lstsq(np.stack([real[ok], picture[ok], np.ones(ok.sum())], 1), drawn[ok], rcond=None)[0]
    closed = ok & (real < CLOSED)
    bins = np.digitize(real[ok], RESPONSE_BINS[1:-1])
    return {"r": pearson(drawn[ok], real[ok]), "asked": weights[0], "own": weights[1], "leak": source_leak(drawn, picture, real),
            "closed_real": float(real[closed].mean()) if closed.any() else np.nan,
            "closed_drawn": float(drawn[closed].mean()) if closed.any() else np.nan,
            "response": np.stack([np.bincount(bins, values, minlength=len(RESPONSE_BINS) - 1)
                                  for values in (np.ones(ok.sum()), real[ok], drawn[ok])])}


def format_response(response: np.ndarray) -> str:
    """The summed response rows `(3, bins)` (frames, real opening, drawn opening) → one line per row."""
    frames = np.maximum(response[0], 1)
    edges = [f"{100 * lo:g}-{100 * hi:g}" if np.isfinite(hi) else f">{100 * lo:g}" for lo, hi in zip(RESPONSE_BINS, RESPONSE_BINS[1:])]
    return "\n".join([f"{'real opening %IOD':<20}" + "".join(f"{e:>9}" for e in edges),
                       f"{'frames':<20}" + "".join(f"{int(n):>9d}" for n in response[0]),
                       f"{'real, mean':<20}" + "".join(f"{100 * v:>9.2f}" for v in response[1] / frames),
                       f"{'drawn, mean':<20}" + "".join(f"{100 * v:>9.2f}" for v in response[2] / frames)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--people", choices=("training", "validation"), default="training")
    parser.add_argument("--renderer", choices=RENDERERS, default=PipelineConfig.renderer)
    args = parser.parse_args(argv)
    pipeline = AvatarPipeline.from_pretrained(config=PipelineConfig(drift=False, renderer=args.renderer))
    rows: typing.List[dict] = []
    jumps: typing.Dict[str, typing.List[np.ndarray]] = {"drawn": [], "real": []}
    print(f"{'person':<20}{'opening r':>10}{'asked':>8}{'own':>8}{'leak':>8}{'closed: real / drawn':>24}{'no entry':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        for k, (person, path) in enumerate(talking_clips(args.clips, args.seconds, validation=args.people == "validation")):
            clip = media.read_video(path, with_audio=False, max_frames=int(round(args.seconds * (media.probe(path).fps or 25))))
            real, backwards, drawn = folder / f"real{k}.mp4", folder / f"backwards{k}.mp4", folder / f"drawn{k}.mp4"
            media.write_video(real, clip.frames, clip.fps, crf=12)
            media.write_video(backwards, clip.frames[::-1], clip.fps, crf=12)
            no_entry = draw_real_mouths(pipeline, real, backwards, drawn)
            (drawn_opening, drawn_inside), (real_opening, real_inside) = opening_and_inside(drawn), opening_and_inside(real)
            row = {**measure(drawn_opening, opening(backwards), real_opening), "no_entry": no_entry}
            rows.append(row)
            jumps["drawn"].append(inside_jumps(drawn_opening, drawn_inside))
            jumps["real"].append(inside_jumps(real_opening, real_inside))
            print(f"{person:<20}{row['r']:>10.3f}{row['asked']:>8.2f}{row['own']:>8.2f}{row['leak']:>8.3f}"
                  f"{row['closed_real']:>14.3f} / {row['closed_drawn']:.3f}{100 * row['no_entry']:>9.0f}%", flush=True)
    mean = {key: float(np.nanmean([row[key] for row in rows])) for key in rows[0] if key != "response"}
    print(f"{'mean':<20}{mean['r']:>10.3f}{mean['asked']:>8.2f}{mean['own']:>8.2f}{mean['leak']:>8.3f}"
          f"{mean['closed_real']:>14.3f} / {mean['closed_drawn']:.3f}{100 * mean['no_entry']:>9.0f}%")
    print(f"{len(rows)} {args.people} people, {args.seconds:g} s each, the {args.renderer} renderer drawing each clip's real mouths "
          f"on it played backwards, re-tracked (perfect: r 1, asked 1, own 0, leak 0, closed as real)")
    print("response: the re-tracked opening drawn against the real opening asked for (all frames, binned)")
    print(format_response(sum(row["response"] for row in rows)))
    print("inside jumps: the inside of the mouth's grey level, change between consecutive open frames (levels of 255)")
    for kind in ("real", "drawn"):
        values = np.concatenate(jumps[kind])
        print(f"{kind + ',':<8}{len(values):>5d} pairs: mean {values.mean():.2f}, 95th percentile {np.percentile(values, 95):.2f}, "
              f"99th {np.percentile(values, 99):.2f}")


if __name__ == "__main__":
    main()
