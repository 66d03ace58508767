"""Train the lower-face renderer (a conditional denoiser) on the preprocessing cache.

    python -m training.train_render --cache cache --out runs/render [--steps 20000] [--batch 8] [--init assets/render.pt]
    torchrun --nproc_per_node N -m training.train_render --cache cache --out runs/render     # DDP

Reads top to bottom: data (talking and silent videos of the training people) → model → loop
(v-prediction on the cosine schedule, loss weighted towards the repainted region, plus L1 on the
predicted clean crop there; EMA of weights) → every `--val-every` steps: held-out people, sampled in
`--model.steps` DDIM steps, mouth-region PSNR against the real frame, and a PNG grid (target,
masked, sketch, output) in `<out>/samples/` → checkpoints (`last.pt`, `best.pt`) → TensorBoard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
import typing

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from avatar.config import RenderConfig
from avatar.render.condition import from_unit
from avatar.metrics import masked_psnr
from avatar.render.sampling import alpha_sigma, clean_from_v, noised, sample_ddim, v_target
from avatar.render.unet import Denoiser
from training.export_render import load_denoiser, same_architecture, with_retrieved
from training.common import finish_training, log_training, save_checkpoint, start_process, time_is_up, training_arguments, update_average
from training.render_data import RenderSampler, batch_stream, load_render_clips


@dataclasses.dataclass(frozen=True)
class RenderTrainConfig:
    steps: int = 20000
    batch: int = 8
    lr: float = 2e-4
    warmup: int = 500
    x0_weight: float = 0.5  # L1 on the predicted clean crop in the repainted region
    ema: float = 0.999
    val_every: int = 500
    val_samples: int = 32
    every: int = 1  # use every n-th frame of the clips (memory on small machines)
    seed: int = 0
    bf16: bool = True
    threads: int = 0
    workers: int = 0  # processes making batches ahead (0: this one); a GPU needs several
    minutes: float = 0.0  # stop after this much wall time, validated and saved (0: run all the steps)


def noise_levels(times: np.ndarray, device: torch.device) -> typing.Tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of the schedule at `times (B,)`, as `(B, 1, 1, 1) float32` tensors on `device`."""
    return tuple(torch.from_numpy(np.asarray(v, np.float32)).to(device)[:, None, None, None] for v in alpha_sigma(times))


def torch_model_fn(model: Denoiser, device: torch.device):
    def run(x: np.ndarray, t: np.ndarray, condition: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x).to(device), torch.from_numpy(t).to(device), torch.from_numpy(condition).to(device))
        return out.float().cpu().numpy()
    return run


def validate(model: Denoiser, batch: typing.Dict[str, np.ndarray], device: torch.device, steps: int, seed: int = 0):
    """Sample the held-out batch; mouth-region PSNR (dB) against the real crops, and the outputs."""
    noise = np.random.default_rng(seed).standard_normal(batch["clean"].shape).astype(np.float32)
    x0 = sample_ddim(torch_model_fn(model, device), noise, batch["condition"], steps)
    region = np.broadcast_to(batch["condition"][:, 3:4] > 0.5, x0.shape)
    return masked_psnr(x0 * 127.5, batch["clean"] * 127.5, region), x0


def save_grid(path: pathlib.Path, batch: typing.Dict[str, np.ndarray], x0: np.ndarray, rows: int = 8) -> None:
    from PIL import Image

    tiles = []
    for i in range(min(rows, x0.shape[0])):
        masked = from_unit(batch["condition"][i, :3])
        sketch = (np.clip(batch["condition"][i, -3:].max(axis=0), 0, 1) * 255).astype(np.uint8)
        region = batch["condition"][i, 3] > 0.5
        output = np.where(region[..., None], from_unit(x0[i]), from_unit(batch["clean"][i]))
        tiles.append(np.concatenate([from_unit(batch["clean"][i]), masked, np.stack([sketch] * 3, -1), output], axis=1))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(path)


def main(argv: typing.Optional[typing.Sequence[str]] = None) -> int:
    args, cfg, model_cfg = training_arguments("python -m training.train_render", __doc__.splitlines()[0], RenderTrainConfig,
                                              RenderConfig, "start from these weights (a checkpoint, or the committed assets/render.pt)", argv)
    rank, world, device = start_process(cfg.threads, cfg.seed)
    main_process = rank == 0

    # 1. Data: every usable frame of the training people; a fixed held-out batch of validation people.
    train_clips = load_render_clips(args.cache, "train", model_cfg.crop_size, cfg.every)
    val_clips = load_render_clips(args.cache, "val", model_cfg.crop_size, max(cfg.every, 4))
    if not train_clips:
        print(f"error: no usable training clips in {args.cache}; run training.preprocess first", file=sys.stderr)
        return 2
    sampler = RenderSampler(train_clips, model_cfg, seed=cfg.seed * 1000 + rank)
    val_batch = RenderSampler(val_clips or train_clips, model_cfg, augment=False, seed=12345).batch(cfg.val_samples)

    # 2. Model, EMA copy, optimiser.
    model = Denoiser(model_cfg).to(device).to(memory_format=torch.channels_last)
    average = Denoiser(model_cfg).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    start_step, best = 0, -math.inf
    if args.resume and (args.out / "last.pt").exists():
        state = torch.load(args.out / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["raw"])
        average.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start_step, best = state["step"], state.get("best", -math.inf)
    else:
        if args.init:
            initial = load_denoiser(args.init)
            if initial.config.retrieved != model_cfg.retrieved:  # more retrieved references: the stem widened, the rest kept
                try:
                    initial = with_retrieved(initial, model_cfg)
                except ValueError as error:
                    print(f"error: {args.init}: {error}", file=sys.stderr)
                    return 2
            if not same_architecture(initial.config, model_cfg):
                print(f"error: {args.init} is a model of another shape; give the same --model.* options", file=sys.stderr)
                return 2
            model.load_state_dict(initial.state_dict())
        average.load_state_dict(model.state_dict())
    average.requires_grad_(False)
    trainable = DistributedDataParallel(model) if world > 1 else model

    writer = None
    if main_process:
        (args.out / "samples").mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.out / "tb"))
        (args.out / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)}, indent=1))
        print(f"{len(train_clips)} training clips ({sum(int(c.usable.sum()) for c in train_clips)} frames), {len(val_clips)} held-out clips; "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; {world} process(es) on {device}", flush=True)

    # 3. The loop.
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 7 * rank)
    batches = batch_stream(sampler, cfg.batch, workers=cfg.workers, seed=cfg.seed * 1000 + rank)
    done = 0
    for step in range(start_step, cfg.steps):
        last = step == cfg.steps - 1 or time_is_up(started, cfg.minutes, world, device)
        model.train()
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        batch = next(batches)
        clean = torch.from_numpy(batch["clean"]).to(device)
        condition = torch.from_numpy(batch["condition"]).to(device)
        mask = torch.from_numpy(batch["mask"]).to(device)
        weight = 0.1 + mask  # the whole crop counts a little, the repainted region most
        times = rng.uniform(0.0, 1.0, cfg.batch).astype(np.float32)
        t = torch.from_numpy(times).to(device)
        noise = torch.randn_like(clean)
        alpha, sigma = noise_levels(times, device)
        x_t = noised(clean, noise, alpha, sigma)
        target_v = v_target(clean, noise, alpha, sigma)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            v = trainable(x_t.contiguous(memory_format=torch.channels_last), t, condition.contiguous(memory_format=torch.channels_last))
        v = v.float()
        v_loss = ((v - target_v) ** 2 * weight).mean() / weight.mean()
        x0 = clean_from_v(x_t, v, alpha, sigma)
        x0_loss = ((x0 - clean).abs() * mask).sum() / (mask.sum() * 3).clamp(min=1)
        loss = v_loss + cfg.x0_weight * x0_loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        update_average(average, model, min(cfg.ema, (1.0 + step) / (10.0 + step)))  # warm-up: forget the random start
        if main_process and (step % 50 == 0 or last):
            log_training(writer, step, {"loss": loss, "v": v_loss, "x0_l1": x0_loss},
                         (step + 1 - start_step) / (time.perf_counter() - started))

        # 4. Validation on held-out people; sample grid; checkpoints.
        if main_process and ((step + 1) % cfg.val_every == 0 or last):
            average.eval()
            psnr, x0_val = validate(average, val_batch, device, model_cfg.steps)
            writer.add_scalar("val/mouth_psnr", psnr, step)
            save_grid(args.out / "samples" / f"step{step + 1:06d}.png", val_batch, x0_val)
            print(f"val step {step + 1}: mouth-region PSNR {psnr:.2f} dB ({model_cfg.steps} steps)", flush=True)
            state = {"model": average.state_dict(), "raw": model.state_dict(), "optimiser": optimiser.state_dict(),
                     "step": step + 1, "model_config": dataclasses.asdict(model_cfg), "train_config": dataclasses.asdict(cfg)}
            if psnr > best:
                best = psnr
                save_checkpoint(args.out / "best.pt", **state, best=best)
            save_checkpoint(args.out / "last.pt", **state, best=best)
            writer.flush()
        done += 1
        if last:
            break
    del trainable  # the DDP wrapper and its reducer go before the process group
    finish_training(world, writer, done, time.perf_counter() - started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
