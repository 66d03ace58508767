"""Train the motion model (speech → mouth and jaw landmarks) on the preprocessing cache.

    python -m training.train_motion --cache cache --out runs/motion_live                      # the live model (causal)
    python -m training.train_motion --cache cache --out runs/motion_offline --no-model.causal  # the offline model
    torchrun --nproc_per_node 2 -m training.train_motion --cache cache --out runs/motion_live   # DDP (gloo on CPU, NCCL on GPUs)

Needs the speech features in the cache (`python -m training.speech_features --cache cache`).
Reads top to bottom: data → PCA basis → model → loop (loss = landmark error + velocity + acceleration +
amplitude (+ closure); with `--teacher`, speech-only clips labelled by the offline model (or a mean of several); an exponential
moving average of the weights is kept) → validation of the averaged weights
on held-out people every `--val-every` steps → checkpoints (`last.pt`, and `best.pt` by held-out lip
distance; "model" holds the averaged weights, "raw" the trained ones) → TensorBoard logs in `<out>/tb`. `--resume` continues from
`<out>/last.pt`; `--init` starts from given weights (e.g. the committed `assets/motion_live.pt`).
`--fold k/K` validates on the k-th of K person folds of the training people instead, trained on the
others: K runs compare recipes without the held-out people.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import typing

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from avatar.config import MotionConfig
from avatar.face import landmarks as lm
from avatar.motion.model import MotionModel
from training.common import finish_training, log_training, save_checkpoint, start_process, training_arguments, update_average
from training.motion_data import MotionSampler, load_motion_clips, load_noise_features, load_speech_only, pca_basis
from training.readout import person_folds
from training.motion_eval import evaluate_motion


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 800
    batch: int = 32  # sequences per process and step
    seq_len: int = 48  # video frames per sequence
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 200
    distance: str = "l2"  # the per-frame term: "l2" (10 × squared error) or "l1" (lowered held-out r here)
    velocity_weight: float = 1.0
    acceleration_weight: float = 0.5
    amplitude_weight: float = 0.5
    closure_weight: float = 0.0  # extra weight on the lips' opening where the real ones are closed
    closed_below: float = 0.04  # real inner-lip opening beyond rest (mouth widths) under which a frame counts as closed
    silence_prob: float = 0.08
    noisy_share: float = 0.67  # sequences whose audio is a noisy variant (training.speech_features)
    teacher: str = ""  # motion models' torch copies, comma-separated (e.g. assets/motion_offline.pt): their mean offsets label the speech-only clips
    speech_only_share: float = 0.5  # with a teacher: share of sequences from speech-only clips, its offsets as targets
    ema: float = 0.995  # weights are averaged over steps; validation, best.pt and export use the average
    val_every: int = 50
    fold: str = ""  # "k/K": leave the k-th of K person folds of the training people out and validate on them (not the held-out people)
    seed: int = 0
    bf16: bool = True
    threads: int = 0  # torch threads per process (0: leave torch's default)


def sequence_loss(predicted: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
                  cfg: TrainConfig) -> typing.Tuple[torch.Tensor, typing.Dict[str, float]]:
    """Loss on offsets in rest mouth widths: predicted, target `(B, L, K, 2)`; keep `(B, L) bool`."""
    mask = keep.float()[..., None, None]
    error = (predicted - target).abs() if cfg.distance == "l1" else 10.0 * (predicted - target) ** 2  # 10: similar size at 0.1 widths
    frame = (error * mask).sum() / (mask.sum() * target.shape[2] * 2).clamp(min=1)
    vel_mask = (keep[:, 1:] & keep[:, :-1]).float()[..., None, None]
    velocity = ((torch.diff(predicted, dim=1) - torch.diff(target, dim=1)).abs() * vel_mask).sum() / (
        vel_mask.sum() * target.shape[2] * 2).clamp(min=1)
    acc_mask = (keep[:, 2:] & keep[:, 1:-1] & keep[:, :-2]).float()[..., None, None]
    acceleration = ((torch.diff(predicted, n=2, dim=1) - torch.diff(target, n=2, dim=1)).abs() * acc_mask).sum() / (
        acc_mask.sum() * target.shape[2] * 2).clamp(min=1)
    # Amplitude: per sequence, the spread over time of every coordinate should match the real one
    # (plain L1 on little data shrinks motion towards the mean).
    weight = keep.float()[..., None, None]
    count = weight.sum(dim=1, keepdim=True).clamp(min=1)
    def spread(x):
        centre = (x * weight).sum(dim=1, keepdim=True) / count
        return (((x - centre).abs() * weight).sum(dim=1) / count[:, 0])
    amplitude = (spread(predicted) - spread(target)).abs().mean()
    # Closure: where the real lips are closed (bilabials, pauses), the predicted opening's error (both ways:
    # pushing only one way teaches lips that overlap).
    def opening(x):
        return x[..., lm.MOUTH_LOWER_INNER, 1] - x[..., lm.MOUTH_UPPER_INNER, 1]
    closed = (keep & (opening(target) < cfg.closed_below)).float()
    closure = ((opening(predicted) - opening(target)).abs() * closed).sum() / closed.sum().clamp(min=1)
    loss = frame + cfg.velocity_weight * velocity + cfg.acceleration_weight * acceleration + cfg.amplitude_weight * amplitude \
        + cfg.closure_weight * closure
    parts = {"frame": frame, "velocity": velocity, "acceleration": acceleration, "amplitude": amplitude, "closure": closure}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


class TrainingForward(torch.nn.Module):
    """What DDP wraps: forward returns PCA coefficients."""

    def __init__(self, model: MotionModel):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.coefficients(features)


def torch_predictor(model: MotionModel, device: torch.device):
    def predict(features: np.ndarray, rest: np.ndarray, voice=None) -> np.ndarray:  # (a network has no read-out to weigh by voice)
        with torch.no_grad():
            out = model(torch.from_numpy(features[None]).to(device), torch.from_numpy(rest[None]).to(device))
        return out[0].float().cpu().numpy()
    return predict


def teacher_offsets(paths: str):
    """The teachers' mean offsets in rest mouth widths, `(T, D)` features → `(T, K, 2)`; `paths`: one
    motion model's torch copy or checkpoint, or several, comma-separated (an ensemble taught as one)."""
    import pathlib

    from avatar.motion.model import ClosureGated
    from training.export_motion import load_model

    teachers = []
    for path in paths.split(","):
        teacher = load_model(pathlib.Path(path))
        if isinstance(teacher, ClosureGated):  # the network alone: the shipped live model was taught by it (the gate came later)
            teacher = teacher.network
        teachers.append(teacher)

    def label(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            batch = torch.from_numpy(features[None])
            return torch.stack([t.offsets(t.coefficients(batch))[0] for t in teachers]).mean(0).numpy()
    return label


def main(argv: typing.Optional[typing.Sequence[str]] = None) -> int:
    args, cfg, model_cfg = training_arguments("python -m training.train_motion", __doc__.splitlines()[0], TrainConfig, MotionConfig,
                                              "start from these weights (a checkpoint or assets/motion_live.pt, assets/motion_offline.pt)", argv)
    rank, world, device = start_process(cfg.threads, cfg.seed)
    main_process = rank == 0

    # 1. Data: talking clips of training people; validation clips of held-out people.
    train_clips = load_motion_clips(args.cache, "train")
    val_clips = load_motion_clips(args.cache, "val")
    if cfg.fold:  # choosing a recipe without looking at the held-out people
        k, _, folds = cfg.fold.partition("/")
        if not (k.isdigit() and folds.isdigit() and int(k) < int(folds)):
            print(f"error: --fold {cfg.fold!r}: give k/K with 0 ≤ k < K (e.g. 0/5)", file=sys.stderr)
            return 2
        k, folds = int(k), int(folds)
        train_clips, val_clips = list(person_folds(train_clips, folds))[k]
    if not train_clips:
        print(f"error: no training clips with speech features in {args.cache}; run training.preprocess, then "
              "training.speech_features", file=sys.stderr)
        return 2
    kind = "live" if model_cfg.causal else "offline"
    width = train_clips[0].speech[f"{kind}_0"].shape[1]  # live: each frame's row and those after it (SpeechConfig.live_ahead)
    if model_cfg.features == MotionConfig().features and width != model_cfg.features:  # not given: the cache's width
        model_cfg = dataclasses.replace(model_cfg, features=width)
    elif width != model_cfg.features:
        print(f"error: --model.features {model_cfg.features}, but the cache's {kind} features are {width} wide", file=sys.stderr)
        return 2
    noise = load_noise_features(args.cache, kind)
    speech_only = load_speech_only(args.cache, teacher_offsets(cfg.teacher)) if cfg.teacher else []
    sampler = MotionSampler(train_clips, model_cfg, cfg.seq_len, silence_prob=cfg.silence_prob, seed=cfg.seed * 1000 + rank,
                            noise=noise, noisy_share=cfg.noisy_share, speech_only=speech_only,
                            speech_only_share=cfg.speech_only_share)

    # 2. Model with the PCA basis of the training offsets; optimiser; schedule.
    start_step, best = 0, math.inf
    checkpoint = None
    if args.resume and (args.out / "last.pt").exists():
        checkpoint = torch.load(args.out / "last.pt", map_location="cpu", weights_only=False)
    elif args.init:
        checkpoint = torch.load(args.init, map_location="cpu", weights_only=False)
    if checkpoint is not None:
        model_cfg = MotionConfig(**checkpoint["model_config"])
        basis, mean = checkpoint["model"]["basis"], checkpoint["model"]["mean"]
    else:
        basis_np, mean_np, explained = pca_basis(train_clips, model_cfg.n_components)
        basis, mean = torch.from_numpy(basis_np), torch.from_numpy(mean_np)
        if main_process:
            print(f"PCA: {model_cfg.n_components} components hold {100 * explained.sum():.1f}% of the offsets' energy")
    model = MotionModel(model_cfg, basis, mean).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    average = MotionModel(model_cfg, basis, mean).to(device)
    if checkpoint is not None:
        model.load_state_dict({k: v.float() for k, v in checkpoint.get("raw", checkpoint["model"]).items()})
        if args.resume:
            optimiser.load_state_dict(checkpoint["optimiser"])
            start_step, best = checkpoint["step"], checkpoint.get("best", math.inf)
    average.load_state_dict(checkpoint["model"] if checkpoint is not None else model.state_dict())
    average.requires_grad_(False)
    trainable = TrainingForward(model)
    if world > 1:
        trainable = DistributedDataParallel(trainable)
    schedule = lambda step: min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))

    writer = None
    if main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.out / "tb"))
        (args.out / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg),
                                                          "train_clips": len(train_clips), "val_clips": len(val_clips)}, indent=1))
        print(f"{len(train_clips)} training clips ({sum(int(c.keep.sum()) for c in train_clips)} frames), "
              f"{len(noise)} silence/noise recordings, {len(speech_only)} speech-only clips labelled by the teacher "
              f"({sum(c.targets.shape[0] for c in speech_only) / 50:.0f} s), "
              f"{len(val_clips)} held-out clips; {sum(p.numel() for p in model.parameters())} parameters; "
              f"{world} process(es) on {device}")

    # 3. The loop.
    started = time.perf_counter()
    for step in range(start_step, cfg.steps):
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr * schedule(step)
        batch = sampler.batch(cfg.batch)
        features = torch.from_numpy(batch["features"]).to(device)
        target = torch.from_numpy(batch["offsets"]).to(device)
        keep = torch.from_numpy(batch["keep"]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            coefficients = trainable(features)
        loss, parts = sequence_loss(model.offsets(coefficients.float()), target, keep, cfg)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        update_average(average, model, cfg.ema)
        if main_process and (step % 25 == 0 or step == cfg.steps - 1):
            log_training(writer, step, {"loss": loss, **parts, "lr": optimiser.param_groups[0]["lr"]},
                         (step + 1 - start_step) / (time.perf_counter() - started))

        # 4. Validation on held-out people; checkpoints.
        last = step == cfg.steps - 1
        if main_process and ((step + 1) % cfg.val_every == 0 or last):
            average.eval()
            result = evaluate_motion(torch_predictor(average, device), val_clips, model_cfg, shifts=(0,)) if val_clips else None
            state = {"model": average.state_dict(), "raw": model.state_dict(), "optimiser": optimiser.state_dict(), "step": step + 1,
                     "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg)}
            if result is not None:
                s = result["summary"]
                for key in ("lips_model", "lips_rest", "lips_mismatched", "jaw_model", "opening_r_model", "opening_r_mismatched", "opening_std_ratio"):
                    writer.add_scalar(f"val/{key}", s[key], step)
                print(f"val step {step + 1}: lips {s['lips_model']:.3f} (rest {s['lips_rest']:.3f}, mismatched "
                      f"{s['lips_mismatched']:.3f}) %IOD, opening r {s['opening_r_model']:.3f} (mismatched "
                      f"{s['opening_r_mismatched']:.3f}), amplitude {s['opening_std_ratio']:.2f}", flush=True)
                if s["lips_model"] < best:
                    best = s["lips_model"]
                    save_checkpoint(args.out / "best.pt", **state, best=best, val=s)
            state["best"] = best
            save_checkpoint(args.out / "last.pt", **state)
            writer.flush()
    del trainable  # the DDP wrapper and its reducer go before the process group
    finish_training(world, writer, cfg.steps - start_step, time.perf_counter() - started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
