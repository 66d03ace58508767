"""The motion models' closure gate: where a linear read-out of the speech features says the real lips
close, the predicted mouth is pulled to rest (`avatar.motion.model.ClosureGated`).

    python -m training.closure_gate --cache cache --network assets/motion_offline.pt --out assets/motion_offline.onnx \
        --torch-copy assets/motion_offline.pt
    python -m training.closure_gate --cache cache --network runs/motion_live/blend.pt --teacher assets/motion_offline.pt \
        --out assets/motion_live.onnx --torch-copy assets/motion_live.pt   # the live blend (training.linear_motion --blend)
    python -m training.closure_gate --cache cache --fold-networks runs/live_fold{0,1,2,3}/last.pt   # the live gate's study
    python -m training.closure_gate --cache cache --teacher-study        # the live read-out's teacher: weight, matched gate

The read-out: ridge regression, on the training people's kept frames, from 5 frames of features
(offline: whole-utterance features, centred on the frame; live: live features, the frame and the 4
before it, so the live model stays causal) to "the real inner-lip gap is under 3 % of the
inter-ocular distance" (1, else 0; `training.closures.CLOSED_PCT_IOD`); λ by leave-people-out
ranking (AUC) on the training people. Where the read-out passes the threshold the mouth starts
towards rest, and it is there at `full`. Both were chosen on the training people too (`--fold-networks`,
`gate_study`): 4 networks each trained without a quarter of them (`training.train_motion --fold k/4`,
the shipped recipe), each gated by a read-out fitted without the same quarter, scored on it (live:
with the blend's read-out also fitted without the quarter; `assets/MODELS.md`). The networks
are unchanged (their weights from the torch copy); the torch copy then holds the gate too (the live
model's teacher is the offline network alone).

The live read-out may also learn from the speech-only clips (`--teacher`): the offline model's
closure read-out, which hears the whole utterance, labels their frames, and the live read-out is fitted
on the videos' frames and those together (`TEACHER_WEIGHT` a speech-only frame). The weight and the
gate's operating point come from `--teacher-study` on the training people alone (`teacher_study`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import typing

import numpy as np

from avatar.face import landmarks as lm
from avatar.motion.model import ClosureGated, MotionBlend, MotionModel, closure_pull
from training.closures import CLOSED_PCT_IOD
from training.common import FP16_MIN_ELEMENTS
from training.linear_motion import fit
from training.motion_data import MotionClip, clip_features, iter_speech_only, load_motion_clips
from training.readout import LAGS, person_folds, stacked

LAMBDAS = (1e3, 1e4, 3e4, 1e5)
THRESHOLD, FULL = 0.25, 0.6  # offline: the mouth starts towards rest at 0.25 and is there from 0.6 (assets/MODELS.md)
LIVE_THRESHOLD, LIVE_FULL = 0.15, 0.6  # live; both chosen by `--fold-networks` (the best opening r)
# Live with a teacher (`--teacher`): the speech-only frames' weight in the read-out's fit, the best of
# TEACHER_WEIGHTS by the folds' AUC, and the gate's operating point matched to LIVE_THRESHOLD-LIVE_FULL
# on the folds' pooled scores (`--teacher-study`; assets/MODELS.md), at the λ the cache chooses (100,000).
TEACHER_WEIGHTS = (0.0, 1.0, 2.0, 4.0)
TEACHER_WEIGHT = 4.0
TAUGHT_THRESHOLD, TAUGHT_FULL = 0.144, 0.493


def design(clips: typing.Sequence[MotionClip], live: bool = False) -> typing.Tuple[np.ndarray, np.ndarray]:
    """Stacked features `(N, LAGS·D)` (offline: whole-utterance, centred; live: live, causal) and the
    closed label `(N,)` over the clips' kept frames."""
    xs, ys = [], []
    for clip in clips:
        gap = lm.inner_gap(clip.mouth) / clip.iod * 100
        keep = clip.keep & np.isfinite(gap)
        xs.append(stacked(clip_features(clip, live=live), live)[keep])
        ys.append((gap[keep] < CLOSED_PCT_IOD).astype(np.float64))
    return np.concatenate(xs).astype(np.float64), np.concatenate(ys)


@dataclasses.dataclass
class RidgeSums:
    """What a ridge fit needs of weighted rows (x, y): Σ w·x xᵀ, Σ w·x, Σ w·x y, Σ w·y, Σ w. Sums of
    two sets add; `solve` is `training.linear_motion.fit` on their union."""

    xx: np.ndarray
    x: np.ndarray
    xy: np.ndarray
    y: float
    n: float

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, weight: float = 1.0) -> "RidgeSums":
        """Of rows `x (N, F) float64`, targets `y (N,)`, each with `weight`."""
        return cls(x.T @ x, x.sum(0), x.T @ y, float(y.sum()), float(len(y))).scaled(weight)

    def scaled(self, weight: float) -> "RidgeSums":
        """The same rows, each weighted `weight` times more."""
        return RidgeSums(weight * self.xx, weight * self.x, weight * self.xy, weight * self.y, weight * self.n)

    def __add__(self, other: "RidgeSums") -> "RidgeSums":
        return RidgeSums(self.xx + other.xx, self.x + other.x, self.xy + other.xy, self.y + other.y, self.n + other.n)

    def solve(self, lam: float) -> typing.Tuple[np.ndarray, np.ndarray, float]:
        """Ridge on centred data → (weights `(F,)`, x mean `(F,)`, y mean)."""
        x_mean, y_mean = self.x / self.n, self.y / self.n
        centred = self.xx - self.n * np.outer(x_mean, x_mean)
        return np.linalg.solve(centred + lam * np.eye(len(centred)), self.xy - x_mean * self.y), x_mean, y_mean


def speech_only_design(cache_root: pathlib.Path, fps: float = 25.0) -> typing.Tuple[np.ndarray, np.ndarray]:
    """The speech-only clips (`training.motion_data.iter_speech_only`, clean variant) at `fps` video
    frames: the live read-out's stacked features `(N, LAGS·D_live) float64` and the offline read-out's
    `(N, LAGS·D_offline) float64`."""
    from avatar.speech.encoder import interpolate_frames

    lives, offlines = [], []
    for _, speech, at in iter_speech_only(cache_root, fps):
        lives.append(stacked(interpolate_frames(speech["live_0"].astype(np.float32), at), live=True))
        offlines.append(stacked(interpolate_frames(speech["offline_0"].astype(np.float32), at), live=False))
    if not lives:
        raise ValueError(f"no speech-only clips in {cache_root}; run training.speech_features without --no-speech-only")
    return np.concatenate(lives).astype(np.float64), np.concatenate(offlines).astype(np.float64)


def teacher_readout(path: pathlib.Path) -> typing.Tuple[np.ndarray, float]:
    """An offline model's closure read-out from its gated torch copy (`--torch-copy` of this script):
    (weights `(LAGS·D,)` on `stacked` offline features, bias)."""
    from training.export_motion import load_model

    model = load_model(path)
    if not isinstance(model, ClosureGated) or model.config.causal:
        raise ValueError(f"{path} is not an offline model with a closure gate (training.closure_gate --torch-copy)")
    weight = model.conv.weight.detach().double().numpy()[0]  # (D, LAGS), oldest lag first
    return weight.T.reshape(-1), float(model.conv.bias.detach().double()[0])


def teacher_study(clips: typing.Sequence[MotionClip], cache_root: pathlib.Path, lam: float,
                  weights: typing.Sequence[float] = TEACHER_WEIGHTS, folds: int = 4) -> typing.Dict[float, typing.Dict[str, typing.Any]]:
    """The live read-out fitted also on the speech-only clips, labelled by the offline read-out, on the
    training people alone: in each of `folds` person folds the offline read-out is fitted on the other
    people (λ `lam`) and its values label the speech-only frames; the live read-out is fitted on those
    people's frames plus the speech-only ones at each weight (0: the videos alone) and ranks the fold's
    frames. Returns, per weight: `auc` (frame-weighted mean), `folds` (each fold's AUC), and `gate`, the
    (threshold, full) whose shares of the pooled out-of-fold scores above them equal those of the
    weight-0 scores above LIVE_THRESHOLD and LIVE_FULL (the shipped gate's operating point)."""
    live_so, offline_so = speech_only_design(cache_root)
    so = RidgeSums.of(live_so, np.zeros(len(live_so)))  # the speech-only Gram once; labels per fold
    scores: typing.Dict[float, typing.List[np.ndarray]] = {w: [] for w in weights}
    rows: typing.Dict[float, typing.List[typing.Tuple[float, int]]] = {w: [] for w in weights}
    for fitted, held in person_folds(clips, folds):
        teacher, t_mean, t_y = fit(*design(fitted, live=False), lam)
        taught = (offline_so - t_mean) @ teacher + t_y
        fold_so = dataclasses.replace(so, xy=live_so.T @ taught, y=float(taught.sum()))
        videos = RidgeSums.of(*design(fitted, live=True))
        x_held, y_held = design(held, live=True)
        for w in weights:
            read, x_mean, y_mean = (videos + fold_so.scaled(w)).solve(lam)
            scores[w].append((x_held - x_mean) @ read + y_mean)
            rows[w].append((auc(scores[w][-1], y_held), len(y_held)))
    plain = np.concatenate(scores[weights[0]])
    results = {}
    for w in weights:
        pooled = np.concatenate(scores[w])
        gate = tuple(float(np.quantile(pooled, np.mean(plain <= level))) for level in (LIVE_THRESHOLD, LIVE_FULL))
        results[w] = {"auc": float(np.average([a for a, _ in rows[w]], weights=[n for _, n in rows[w]])),
                      "folds": [a for a, _ in rows[w]], "gate": gate}
    return results


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The chance that a closed frame scores above an open one (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    positive = labels > 0.5
    n_closed, n_open = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_closed * (n_closed + 1) / 2) / (n_closed * n_open))


def choose_lambda(clips: typing.Sequence[MotionClip], folds: int = 4, live: bool = False) -> typing.Tuple[float, typing.Dict[float, float]]:
    """The λ with the best frame-weighted AUC over leave-people-out folds of the training people (as
    many folds as people, when fewer)."""
    scores: typing.Dict[float, typing.List[typing.Tuple[float, int]]] = {}
    for fitted, held in person_folds(clips, min(folds, len({c.person for c in clips}))):
        x, y = design(fitted, live)
        x_held, y_held = design(held, live)
        for lam in LAMBDAS:
            weights, x_mean, y_mean = fit(x, y, lam)
            scores.setdefault(lam, []).append((auc((x_held - x_mean) @ weights + y_mean, y_held), len(y_held)))
    means = {lam: float(np.average([a for a, _ in rows], weights=[n for _, n in rows])) for lam, rows in scores.items()}
    return max(means, key=means.get), means


STUDY_GATES = ((0.5, 1.0), (0.4, 1.0), (0.3, 1.0), (0.25, 1.0), (0.2, 1.0), (0.15, 1.0), (0.1, 1.0), (0.0, 1.0),
               (0.25, 0.75), (0.25, 0.6), (0.25, 0.5), (0.15, 0.75), (0.15, 0.6), (0.15, 0.5), (0.15, 0.4),
               (0.3, 0.6), (0.3, 0.5), (0.35, 0.5), (0.35, 0.6), (0.4, 0.6))
STUDY_KEYS = ("opening_r_model", "lips_model", "events_model", "false_closures_model")


def gate_study(clips: typing.Sequence[MotionClip], networks: typing.Sequence[pathlib.Path],
               noise: typing.Sequence[np.ndarray], gates: typing.Sequence[typing.Tuple[float, float]] = STUDY_GATES,
               ) -> typing.Dict[typing.Optional[typing.Tuple[float, float]], typing.Dict[str, float]]:
    """The gate's threshold and full pull, chosen on the training people alone: `networks[k]` is a
    network trained without the k-th of len(networks) person folds (`training.train_motion --fold
    k/K`); its fold's people are scored with the model as shipped (offline: the network; live: the
    network and the read-out fitted without them, weighed in by voice,
    `avatar.motion.runner.READOUT_WEIGHT`) and a closure gate fitted without them (centred offline,
    causal live), for each (threshold, full) (None: no gate). Returns each gate's frame-weighted
    opening r, lips L1 (%IOD), share of the real closures in speech closed, share of clearly open
    voiced frames closed (`training.motion_eval`)."""
    import torch

    from avatar.motion.runner import READOUT_WEIGHT
    from training import linear_motion
    from training.export_motion import load_model
    from training.motion_data import width_of
    from training.motion_eval import evaluate_motion

    rows: typing.Dict[typing.Optional[typing.Tuple[float, float]], typing.List[typing.Tuple[typing.Dict[str, float], typing.Dict[str, int]]]] = {}
    for (fitted, held), path in zip(person_folds(clips, len(networks)), networks):
        network = load_model(path)
        while not isinstance(network, MotionModel):  # a shipped copy: its network alone (gate and read-out are refitted)
            network = network.network
        live = network.config.causal
        if live:
            lam, _ = linear_motion.choose_lambda(fitted, noise)
            readout = linear_motion.fit(*linear_motion.design(fitted, noise), lam)
        gate_lam, _ = choose_lambda(fitted, live=live)
        weights, x_mean, y_mean = fit(*design(fitted, live=live), gate_lam)

        def shipped(features: np.ndarray, rest: np.ndarray, voice: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                own = network(torch.from_numpy(features)[None], torch.from_numpy(rest)[None])[0].numpy()
            if not live:
                return own
            offsets = (stacked(features, live=True) - readout[1]) @ readout[0] + readout[2]
            linear = rest[None] + offsets.reshape(len(features), -1, 2) * width_of(rest)
            return own + READOUT_WEIGHT * voice[:, None, None] * (linear - own)

        for gate in (None, *gates):
            def predict(features, rest, voice, gate=gate):
                out = shipped(features, rest, np.asarray(voice, np.float64))
                if gate is None:
                    return out
                closed = (stacked(features, live=live) - x_mean) @ weights + y_mean
                pull = closure_pull(closed, *gate)
                return out + pull[:, None, None] * (rest[None] - out)

            summary = evaluate_motion(predict, held, network.config, shifts=(0,))["summary"]
            counts = {"events_model": summary["events_count"], "false_closures_model": summary["false_closures_count"]}
            rows.setdefault(gate, []).append(({k: summary[k] for k in STUDY_KEYS}, {k: counts.get(k, summary["frames"]) for k in STUDY_KEYS}))
        print(f"fold {path}: " + ", ".join(f"{gate_name(g)}: r {v[-1][0]['opening_r_model']:.3f} lips {v[-1][0]['lips_model']:.3f} "
                                           f"closed {v[-1][0]['events_model']:.2f}" for g, v in rows.items()), flush=True)
    # r and lips weighted by frames, the closure shares by the runs and frames they count
    return {g: {k: float(np.average([m[k] for m, _ in v], weights=[n[k] for _, n in v])) for k in STUDY_KEYS} for g, v in rows.items()}


def gate_name(gate: typing.Optional[typing.Tuple[float, float]]) -> str:
    return "none" if gate is None else f"{gate[0]:g}-{gate[1]:g}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.closure_gate", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--network", type=pathlib.Path, help="the offline network's torch copy (training.export_motion "
                        "--torch-copy), or the live blend's (training.linear_motion --blend --torch-copy)")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--threshold", type=float, help="read-out value from which the mouth starts closing "
                        f"(default: offline {THRESHOLD}, live {LIVE_THRESHOLD})")
    parser.add_argument("--torch-copy", type=pathlib.Path, help="also save the gated model's torch copy here (the network's fp16 "
                        "state dict and config, a blend's read-out, the gate's weights; training.export_motion.load_model reads it)")
    parser.add_argument("--full", type=float, help="read-out value at which the mouth is fully at rest "
                        f"(default: offline {FULL}, live {LIVE_FULL})")
    parser.add_argument("--teacher", type=pathlib.Path, help="live gate: fit its read-out also on the cache's speech-only clips, "
                        "labelled by this offline model's closure read-out (its gated torch copy, e.g. assets/motion_offline.pt); "
                        f"the gate then defaults to {TAUGHT_THRESHOLD}-{TAUGHT_FULL}")
    parser.add_argument("--teacher-weight", type=float, default=TEACHER_WEIGHT,
                        help="a speech-only frame's weight against a video frame's in that fit")
    parser.add_argument("--teacher-study", action="store_true", help="instead: study the teacher's weight on the training "
                        "people's folds (AUC) and the gate matched to the shipped one")
    parser.add_argument("--fold-networks", type=pathlib.Path, nargs="+", help="instead: study the gate's threshold and "
                        "full pull with K networks (offline or live), the k-th trained without the k-th of K person folds "
                        "(train_motion --fold k/K)")
    args = parser.parse_args(argv)
    import torch

    from training.export_motion import export_half_weights, load_model

    clips = load_motion_clips(args.cache, "train")
    if len({c.person for c in clips}) < 2:
        print(f"error: fewer than two training people with speech features in {args.cache}; run training.preprocess and "
              "training.speech_features", file=sys.stderr)
        return 2
    if args.teacher_study:
        lam, _ = choose_lambda(clips, live=True)
        try:
            results = teacher_study(clips, args.cache, lam)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"live closure read-out taught on the speech-only clips (λ {lam:g}), training people's folds: weight, AUC "
              f"(each fold), the gate matched to {LIVE_THRESHOLD}-{LIVE_FULL}")
        for w, m in results.items():
            print(f"{w:6g} {m['auc']:.4f} ({' / '.join(f'{a:.3f}' for a in m['folds'])})  {m['gate'][0]:.3f}-{m['gate'][1]:.3f}")
        return 0
    if args.fold_networks:
        from training.motion_data import load_noise_features

        try:
            results = gate_study(clips, args.fold_networks, load_noise_features(args.cache, "live"))
        except ValueError as exc:  # too few people for the folds, or for choosing λ within one
            print(f"error: {exc}; the study needs at least 5 training people in every fold's fitted part", file=sys.stderr)
            return 2
        print("gate (threshold-full) on the training people's folds: opening r, lips L1 %IOD, real closures in speech "
              "closed, clearly open voiced frames closed")
        for gate, m in results.items():
            print(f"{gate_name(gate):>10s} {m['opening_r_model']:.4f} {m['lips_model']:.3f} {100 * m['events_model']:5.1f}% "
                  f"{100 * m['false_closures_model']:5.2f}%")
        return 0
    if args.network is None or args.out is None:
        print("error: give --network and --out (or --fold-networks)", file=sys.stderr)
        return 2
    network = load_model(args.network)
    if isinstance(network, ClosureGated):  # a copy gated before: its network, gated afresh
        network = network.network
    live = network.config.causal
    if not isinstance(network, MotionBlend if live else MotionModel):
        print(f"error: {args.network} is neither an offline network (MotionModel) nor a live blend (MotionBlend)", file=sys.stderr)
        return 2
    if args.teacher and not live:
        print("error: --teacher is for the live gate (an offline gate would be its own teacher)", file=sys.stderr)
        return 2
    taught = (TAUGHT_THRESHOLD, TAUGHT_FULL) if args.teacher else (LIVE_THRESHOLD, LIVE_FULL)
    threshold = args.threshold if args.threshold is not None else (taught[0] if live else THRESHOLD)
    full = args.full if args.full is not None else (taught[1] if live else FULL)
    lam, means = choose_lambda(clips, live=live)
    print("leave-people-out AUC of the closure read-out on the training people: "
          + ", ".join(f"λ {k:g}: {v:.3f}" for k, v in means.items()))
    sums = RidgeSums.of(*design(clips, live))
    if args.teacher:
        try:
            teacher, bias = teacher_readout(args.teacher)
            live_so, offline_so = speech_only_design(args.cache)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        sums = sums + RidgeSums.of(live_so, offline_so @ teacher + bias, args.teacher_weight)
        print(f"taught by {args.teacher} on {len(live_so)} speech-only frames (weight {args.teacher_weight:g})")
        del live_so, offline_so
    weights, x_mean, y_mean = sums.solve(lam)
    model = ClosureGated.from_ridge(network, weights, x_mean, y_mean, threshold, LAGS, full).eval()
    worst = export_half_weights(model, args.out, 1e-3)  # the large weights stored as float16 (both files)
    if worst is None:
        return 1
    if args.torch_copy:
        base = network.network if live else network
        copy = {"model": {k: v.half() if v.is_floating_point() else v for k, v in base.state_dict().items()},
                "model_config": dataclasses.asdict(base.config),
                "closure": {f"conv.{k}": v for k, v in model.conv.state_dict().items()},
                "closure_threshold": threshold, "closure_full": full, "closure_lambda": lam}
        if args.teacher:
            copy.update(closure_teacher=str(args.teacher), closure_teacher_weight=args.teacher_weight)
        if live:  # the read-out (its large weights as float16, as in the ONNX), and its λ
            copy["linear"] = {k: v.half() if v.numel() >= FP16_MIN_ELEMENTS else v for k, v in network.linear.state_dict().items()}
            state = torch.load(args.network, map_location="cpu", weights_only=False)
            if "lambda" in state:
                copy["lambda"] = state["lambda"]
        torch.save(copy, args.torch_copy)
    print(f"{'live' if live else 'offline'}: λ {lam:g} (cross-validated), threshold {threshold:g}, full {full:g}; wrote {args.out} "
          f"(ONNX parity {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
