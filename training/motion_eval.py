"""Held-out evaluation of the motion model, with its baselines in the same run.

For each validation clip (people never seen in training), with its rest shape from its own closed-mouth
frames. Every prediction is placed at the real frame's head pose (the mouth anchor's shift, as in
dubbing, where the pose comes from the video), so the comparison is about speech-driven motion:
- model: driven by the clip's own speech;
- rest: the closed mouth held (what a still photo would do);
- mismatched: the model driven by another validation clip's speech (another person);
- offsets: the model driven by the clip's own speech shifted by ±1..5 frames (sync must peak at 0);
- real opening (optional): every point placed from the real video's inner-lip gap alone by a linear map
  fitted on the training people (`opening_oracle`): what a model that knew the opening exactly, and
  nothing else about the lips, would score (the distance the opening alone cannot explain);
- where each person keeps the lips (two more rows that know the real clip): the clip's own mean mouth
  held still, and the model's mouths moved by the clip's own mean difference from them (a constant
  per clip: where this person's lips sit while speaking, which the speech does not tell). The
  model's distance above the second row is that placement alone; the first is the score of a still
  mouth that knows it.
Metrics on kept frames: lip landmark distance (mean L1 per coordinate, % of inter-ocular distance),
jaw distance, and the correlation of the inner-lip gap with the real video's; the share of the real
video's closures in speech that the prediction closes too, and of its clearly open voiced frames that
the prediction closes (`training.closures.closure_events`, `false_closures`).
"""

from __future__ import annotations

import typing

import numpy as np

from avatar.config import MotionConfig, SilenceConfig
from avatar.face import landmarks as lm
from avatar.metrics import mouth_landmark_distance, pearson
from avatar.motion.model import POINTS
from avatar.motion.runner import SilenceHold
from training.closures import CLOSED_PCT_IOD, closure_events, closure_rate, events_closed, false_closures
from training.motion_data import MotionClip, clip_features

LIPS = np.arange(len(lm.LIPS_OUTER) + len(lm.LIPS_INNER))  # first 40 of POINTS
JAW = np.arange(len(LIPS), len(POINTS))
SHIFTS = (-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5)

Predictor = typing.Callable[..., np.ndarray]  # features (T, D), rest (K, 2), voice=(T,) voice activity → (T, K, 2)


def shifted(features: np.ndarray, shift: int) -> np.ndarray:
    """Frame t gets the features of frame t + shift (clamped at the ends)."""
    index = np.clip(np.arange(len(features)) + shift, 0, len(features) - 1)
    return features[index]


def opening_oracle(clips: typing.Sequence[MotionClip]) -> np.ndarray:
    """`(2, K * 2) float64`: the least-squares map from [real inner-lip gap, 1] (in rest mouth widths)
    to every point's offsets (in rest mouth widths), over the kept frames of `clips`."""
    gaps = np.concatenate([lm.inner_gap(c.mouth)[c.keep] / c.width for c in clips])
    offsets = np.concatenate([c.offsets[c.keep].reshape(int(c.keep.sum()), -1) for c in clips])
    return np.linalg.lstsq(np.stack([gaps, np.ones_like(gaps)], 1), offsets, rcond=None)[0]


def evaluate_motion(predict: Predictor, clips: typing.Sequence[MotionClip], config: MotionConfig = MotionConfig(),
                    shifts: typing.Sequence[int] = SHIFTS,
                    bilabials: typing.Mapping[str, typing.Sequence[typing.Tuple[str, float, float]]] = {},
                    silence: SilenceConfig = SilenceConfig(),
                    oracle: typing.Optional[np.ndarray] = None) -> typing.Dict[str, typing.Any]:
    """Metrics over all kept frames of `clips` (frame-weighted), and per clip, of the model as the
    engine runs it (`silence`: the mouth rests in long silences). `bilabials` (clip id → /p b m/
    spans, `training.closures.bilabial_spans`) adds the closure rates of those clips; `oracle`
    (`opening_oracle` of the training clips) adds the real-opening row."""
    features = [clip_features(c, config.causal) for c in clips]
    per_clip = []
    sums: typing.Dict[str, float] = {}
    total = 0
    for i, clip in enumerate(clips):
        keep = clip.keep
        n = int(keep.sum())
        real = clip.mouth
        pose = clip.anchor_shift[:, None, :]
        rest = clip.rest[None] + pose
        def run(inputs: np.ndarray, vad: np.ndarray) -> np.ndarray:  # as the engine does: the mouth rests in long silences
            return SilenceHold(clip.fps, silence).apply(predict(inputs, clip.rest, voice=vad), clip.rest, vad) + pose

        own = run(features[i], clip.vad)
        other = (i + next((j for j in range(1, len(clips)) if clips[(i + j) % len(clips)].person != clip.person), 1)) % len(clips)
        mismatched = run(np.resize(features[other], features[i].shape), np.resize(clips[other].vad, clip.vad.shape))
        row = {"clip": clip.clip_id, "person": clip.person, "frames": n}
        rows = [("model", own), ("rest", rest), ("mismatched", mismatched),
                ("held_mean", rest + (real[keep] - rest[keep]).mean(0)), ("placed", own + (real[keep] - own[keep]).mean(0))]
        if oracle is not None:
            gap = lm.inner_gap(real) / clip.width
            offsets = (np.stack([gap, np.ones_like(gap)], 1) @ oracle).reshape(real.shape)
            rows.append(("oracle", rest + offsets * clip.width))
        for name, pred in rows:
            row[f"lips_{name}"] = mouth_landmark_distance(pred[:, LIPS], real[:, LIPS], clip.iod, keep)
            row[f"jaw_{name}"] = mouth_landmark_distance(pred[:, JAW], real[:, JAW], clip.iod, keep)
        row["opening_r_model"] = pearson(lm.inner_gap(own)[keep], lm.inner_gap(real)[keep])
        row["opening_r_mismatched"] = pearson(lm.inner_gap(mismatched)[keep], lm.inner_gap(real)[keep])
        row["opening_std_ratio"] = float(lm.inner_gap(own)[keep].std() / max(lm.inner_gap(real)[keep].std(), 1e-9))
        for s in shifts:
            pred = own if s == 0 else run(shifted(features[i], s), shifted(clip.vad, s))
            row[f"lips_shift_{s:+d}"] = mouth_landmark_distance(pred[:, LIPS], real[:, LIPS], clip.iod, keep)
        real_gap = lm.inner_gap(real) / clip.iod * 100
        events = closure_events(real_gap, clip.vad, clip.fps, keep)
        for name, points in (("model", own), ("mismatched", mismatched)):
            gap = lm.inner_gap(points) / clip.iod * 100
            row[f"events_{name}"] = (events_closed(gap, events), len(events))
            row[f"false_closures_{name}"] = false_closures(gap, real_gap, clip.vad, keep)
        if clip.clip_id in bilabials:
            for name, points in (("model", own), ("real", real), ("mismatched", mismatched)):
                gap = lm.inner_gap(points) / clip.iod * 100
                row[f"closures_{name}"] = closure_rate(gap, bilabials[clip.clip_id], clip.fps, keep)
        per_clip.append(row)
        for key, value in row.items():
            if isinstance(value, float):
                sums[key] = sums.get(key, 0.0) + value * n
        total += n
    summary = {key: value / total for key, value in sums.items()}
    summary["frames"] = total
    summary["clips"] = len(clips)
    summary["best_shift"] = min(shifts, key=lambda s: summary[f"lips_shift_{s:+d}"])
    for name in ("model", "real", "mismatched"):
        counts = [row[f"closures_{name}"] for row in per_clip if f"closures_{name}" in row]
        if counts and sum(c[1] for c in counts):
            summary[f"closure_rate_{name}"] = sum(c[0] for c in counts) / sum(c[1] for c in counts)
            summary["closure_count"] = sum(c[1] for c in counts)
    for name in ("model", "mismatched"):
        for key in ("events", "false_closures"):
            hits, counted = (sum(row[f"{key}_{name}"][k] for row in per_clip) for k in (0, 1))
            summary[f"{key}_{name}"] = hits / max(counted, 1)
            summary[f"{key}_count"] = counted
    return {"summary": summary, "clips": per_clip}


def format_summary(summary: typing.Dict[str, typing.Any]) -> str:
    lines = [
        f"held-out: {summary['clips']} clips, {summary['frames']} frames (people never seen in training)",
        f"{'':22s} {'lips L1 %IOD':>13s} {'jaw L1 %IOD':>12s} {'opening r':>10s}",
        f"{'model':22s} {summary['lips_model']:13.2f} {summary['jaw_model']:12.2f} {summary['opening_r_model']:10.3f}",
        f"{'rest pose (closed)':22s} {summary['lips_rest']:13.2f} {summary['jaw_rest']:12.2f} {'-':>10s}",
        f"{'mismatched audio':22s} {summary['lips_mismatched']:13.2f} {summary['jaw_mismatched']:12.2f} {summary['opening_r_mismatched']:10.3f}",
        *([f"{'real opening, linear':22s} {summary['lips_oracle']:13.2f} {summary['jaw_oracle']:12.2f} {1:10.3f}"]
          if "lips_oracle" in summary else []),
        f"{'own mean mouth, held':22s} {summary['lips_held_mean']:13.2f} {summary['jaw_held_mean']:12.2f} {'-':>10s}",
        f"{'model at own place':22s} {summary['lips_placed']:13.2f} {summary['jaw_placed']:12.2f} {'-':>10s}",
        f"opening amplitude (std) model / real: {summary['opening_std_ratio']:.2f}",
        "audio shift (frames) → lips L1 %IOD: " + ", ".join(
            f"{s:+d}: {summary[f'lips_shift_{s:+d}']:.3f}" for s in SHIFTS if f"lips_shift_{s:+d}" in summary),
        f"lowest error at shift {summary['best_shift']:+d}",
    ]
    if "events_model" in summary:
        lines.append(f"real closures in speech closed too ({summary['events_count']} runs under {CLOSED_PCT_IOD:g}% IOD): "
                     f"model {100 * summary['events_model']:.0f}%, mismatched {100 * summary['events_mismatched']:.0f}%; "
                     f"clearly open voiced frames closed ({summary['false_closures_count']}): "
                     f"model {100 * summary['false_closures_model']:.1f}%, mismatched {100 * summary['false_closures_mismatched']:.1f}%")
    if "closure_rate_model" in summary:
        lines.append(f"/p b m/ closed (inner-lip gap < {CLOSED_PCT_IOD:g}% IOD at the aligned phone, {summary['closure_count']} phones): "
                     f"model {100 * summary['closure_rate_model']:.0f}%, real video {100 * summary['closure_rate_real']:.0f}%, "
                     f"mismatched {100 * summary['closure_rate_mismatched']:.0f}%")
    return "\n".join(lines)


def format_people(clips: typing.Sequence[typing.Dict[str, typing.Any]]) -> str:
    """Per held-out person: frames, lips L1 (model / rest / mismatched), jaw L1 (model / rest), opening r."""
    people: typing.Dict[str, typing.List[typing.Dict[str, typing.Any]]] = {}
    for row in clips:
        people.setdefault(row["person"], []).append(row)
    lines = [f"{'person':16s} {'frames':>6s} {'lips model/rest/mism.':>22s} {'jaw model/rest':>15s} {'r model/mism.':>14s}"]
    for person, rows in people.items():
        n = np.array([r["frames"] for r in rows], float)
        mean = lambda key: float(np.average([r[key] for r in rows], weights=n))
        lines.append(f"{person:16s} {int(n.sum()):6d} {mean('lips_model'):8.2f}{mean('lips_rest'):7.2f}{mean('lips_mismatched'):7.2f} "
                     f"{mean('jaw_model'):8.2f}{mean('jaw_rest'):7.2f} {mean('opening_r_model'):7.2f}{mean('opening_r_mismatched'):7.2f}")
    return "\n".join(lines)
