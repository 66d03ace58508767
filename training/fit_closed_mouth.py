"""Fit the closed-mouth prior (`assets/closed_mouth.npz`): a person's closed, relaxed mouth and jaw
from one open mouth, for portraits that only show the mouth open.

    python -m training.fit_closed_mouth --cache cache [--out assets/closed_mouth.npz]

Pairs from the preprocessing cache, training people only: every open frame of a clip (inner-lip gap
at least 0.08 of the mouth width; up to 60 per clip, evenly spread), and the clip's rest mouth
(`avatar.motion.runner.rest_pose`: the median of its most-closed frames; clips whose most-closed
frames are not closed are left out). Both are the 59 mouth/jaw points measured from the mouth
anchor, in inter-ocular distances. The prior is ridge regression from the open shape to the change
that closes it; the ridge strength is chosen by leave-people-out cross-validation on the training
people. The validation people are only measured (the printed table), against three baselines: the
open mouth as it is (what a portrait gave before), the mean closed mouth of the training people
placed at the anchor, and closing by lifting the lower lip and jaw straight up by the gap.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import typing

import numpy as np

from avatar import media
from avatar.face import landmarks as lm
from avatar.motion.closed import MIN_OPEN_GAP
from avatar.motion.runner import POINTS, rest_pose
from training.cache import open_cache

MAX_REST_GAP = 0.05  # a clip's rest mouth must be this closed (gap over mouth width) to teach closing
PER_CLIP = 60
ALPHAS = (1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0)


def pairs(cache: pathlib.Path, split: str) -> typing.Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`open (N, 59, 2)`, `closed (N, 59, 2)` in inter-ocular distances from the mouth anchor, and
    each pair's person `(N,)`."""
    opened, closed, people = [], [], []
    for clip in open_cache(cache, split=split, kind="video"):
        points = clip.landmarks(128).astype(np.float64)
        keep = clip.keep & np.isfinite(points).all(axis=(1, 2))
        if keep.sum() < 10:
            continue
        rest, anchor = rest_pose(points, keep)
        if lm.inner_gap_ratio(rest) > MAX_REST_GAP:
            continue
        iod = float(np.median(lm.interocular(points[keep])))
        gaps = np.array([lm.inner_gap_ratio(p[POINTS]) if k else 0.0 for p, k in zip(points, keep)])
        frames = np.flatnonzero(keep & (gaps >= MIN_OPEN_GAP))
        frames = frames[np.linspace(0, len(frames) - 1, min(PER_CLIP, len(frames))).round().astype(int)] if len(frames) else frames
        for i in frames:
            opened.append((points[i, POINTS, :2] - lm.mouth_anchor(points[i])) / iod)
            closed.append((rest - anchor) / iod)
            people.append(clip.meta["person"])
    return np.array(opened), np.array(closed), np.array(people)


def fit(opened: np.ndarray, closed: np.ndarray, alpha: float) -> typing.Dict[str, np.ndarray]:
    """Ridge from the open shape (flattened, centred) to the closing change."""
    x = opened.reshape(len(opened), -1)
    y = (closed - opened).reshape(len(opened), -1)
    mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
    xc = x - mean_x
    weights = np.linalg.solve(xc.T @ xc + alpha * len(x) * np.eye(x.shape[1]), xc.T @ (y - mean_y))
    return {"mean_open": mean_x, "mean_change": mean_y, "weights": weights, "alpha": np.float64(alpha)}


def predict(model: typing.Dict[str, np.ndarray], opened: np.ndarray) -> np.ndarray:
    x = opened.reshape(len(opened), -1)
    change = (x - model["mean_open"]) @ model["weights"] + model["mean_change"]
    return (x + change).reshape(opened.shape)


def error(predicted: np.ndarray, closed: np.ndarray) -> float:
    """Mean point distance, % of the inter-ocular distance."""
    return float(100 * np.linalg.norm(predicted - closed, axis=-1).mean())


def lift(opened: np.ndarray) -> np.ndarray:
    """The baseline that lifts the lower lip and jaw straight up by the inner-lip gap."""
    out = opened.copy()
    gap = lm.inner_gap(opened)
    lower = np.r_[np.arange(11, 20), np.arange(31, 40), np.arange(40, 59)]
    out[:, lower, 1] -= gap[:, None]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.fit_closed_mouth", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("assets/closed_mouth.npz"))
    args = parser.parse_args(argv)
    opened, closed, people = pairs(args.cache, "train")
    if len(set(people)) < 3:
        print(f"error: {args.cache} has open and closed mouths of fewer than 3 training people; run training.preprocess",
              file=sys.stderr)
        return 2
    folds = sorted(set(people))
    scores = {}
    for alpha in ALPHAS:
        errors = [error(predict(fit(opened[people != p], closed[people != p], alpha), opened[people == p]), closed[people == p])
                  for p in folds]
        scores[alpha] = float(np.mean(errors))
    alpha = min(scores, key=scores.get)
    model = fit(opened, closed, alpha)
    print(f"train: {len(opened)} open frames of {len(folds)} people; leave-one-person-out error by ridge strength: "
          + ", ".join(f"{a:g}: {e:.2f}" for a, e in scores.items()) + f" → {alpha:g}")
    v_open, v_closed, v_people = pairs(args.cache, "val")
    if len(v_open):
        mean_closed = closed.mean(axis=0)
        rows = {"prior": predict(model, v_open), "open as it is": v_open, "mean closed mouth": np.broadcast_to(mean_closed, v_open.shape),
                "lift by the gap": lift(v_open)}
        print(f"held out: {len(v_open)} open frames of {len(set(v_people))} validation people "
              f"({', '.join(sorted(set(v_people)))}); point error, % inter-ocular distance (per person: mean over people):")
        for name, predicted in rows.items():
            per_person = [error(predicted[v_people == p], v_closed[v_people == p]) for p in sorted(set(v_people))]
            gap = np.median([lm.inner_gap_ratio(m) for m in predicted])
            print(f"  {name:<20} {error(predicted, v_closed):6.2f}  per person {np.mean(per_person):6.2f}  median gap/width {gap:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with media.atomic_output(args.out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v, np.float32) for k, v in model.items()}, people=np.array(folds))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
