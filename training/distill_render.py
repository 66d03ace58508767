"""Few-step distillation of the renderer: adversarial diffusion distillation (ADD-style) on the
preprocessing cache.

    python -m training.distill_render --cache cache --teacher assets/render.pt --out runs/distill [--steps 3000] [--draft-share 0.5]
    torchrun --nproc_per_node N -m training.distill_render ...     # DDP

The student starts as a copy of the teacher (or `--init`) and learns to give the clean crop in one
call from the noisy crop at each time of the `--model.steps`-step sampler (t = 1, 0.75, 0.5, 0.25 for
4 steps; the 1- and 2-step samplers use a subset of those times). With `--draft-share`, that share of
the samples starts instead from the warp renderer's draft of the target, noised to a time up to
`--draft-max-time`: what the pipeline does by default (it refines the warp's frame), so the student
learns to mend the draft (borrowed teeth, stretched skin) into the real crop. The teacher, trained for many-step sampling with
a regression loss, is blurry in few steps; three losses on the student's clean crop x̂ push it to be
sharp and still right:

1. reconstruction: L1 to the real crop in the repainted region, and L1 of the image gradients there;
2. distillation: x̂ re-noised at a random time s, the frozen teacher's clean estimate from it is a
   target for x̂ (weighted by alpha(s)², so mostly at low noise, where the teacher keeps detail);
3. adversarial: a patch discriminator sees the lower face (crop, mask, landmark sketch) and tells
   real crops from the student's composites (hinge loss); its weight is set each step from the ratio
   of the reconstruction and adversarial gradients at the student's last layer (as in VQGAN), times
   `--adversarial`.

Every `--val-every` steps: held-out people sampled in `--model.steps` steps by the weight average;
region PSNR and sharpness ratio (Laplacian variance, output / real) printed, a PNG grid saved, and
the averaged student saved as `step<N>.pt` (pick one with `training.eval_render`), plus `last.pt` to
resume. Export the chosen one with `training.export_render`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
import typing

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from avatar.config import RenderConfig
from avatar.metrics import sharpness
from avatar.render.condition import from_unit
from avatar.render.sampling import clean_from_v, noised, timesteps
from avatar.render.unet import Denoiser
from training.common import finish_training, log_training, save_checkpoint, start_process, time_is_up, update_average
from training.render_data import RenderSampler, batch_stream, load_render_clips
from training.export_render import load_denoiser, same_architecture, with_retrieved
from training.train_render import noise_levels, save_grid, validate


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    steps: int = 3000
    batch: int = 8
    lr: float = 2e-5  # the student is already trained: small steps
    lr_discriminator: float = 1e-4
    gradient_weight: float = 1.0  # L1 of image gradients in the region
    distill_weight: float = 1.0
    adversarial: float = 0.5  # multiplies the adaptive weight
    adversarial_start: int = 100  # discriminator-only warm-up before it drives the student
    draft_share: float = 0.0  # share of samples noised from the warp renderer's draft instead of the real crop (what the pipeline refines)
    draft_max_time: float = 0.5  # those samples are taken at the student's times up to this
    ema: float = 0.995
    val_every: int = 250
    val_samples: int = 32
    every: int = 1
    seed: int = 0
    bf16: bool = True
    threads: int = 0
    workers: int = 0  # processes making batches ahead (0: this one); a GPU needs several
    minutes: float = 0.0  # stop after this much wall time, validated and saved (0: run all the steps)


class PatchDiscriminator(nn.Module):
    """Real or rendered, per patch of the crop (receptive field 46 px at 128²).

    forward(crop `(B, 3, S, S)` in [-1, 1], mask `(B, 1, S, S)` in [0, 1], sketch `(B, 3, S, S)` in
    [0, 1]) → logits `(B, 1, S/8, S/8)`. Spectral-normalised convolutions keep the hinge game tame."""

    def __init__(self, width: int = 48):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        act = nn.LeakyReLU(0.2)
        self.net = nn.Sequential(
            sn(nn.Conv2d(7, width, 4, stride=2, padding=1)), act,
            sn(nn.Conv2d(width, width * 2, 4, stride=2, padding=1)), act,
            sn(nn.Conv2d(width * 2, width * 4, 4, stride=2, padding=1)), act,
            sn(nn.Conv2d(width * 4, width * 4, 3, padding=1)), act,
            sn(nn.Conv2d(width * 4, 1, 3, padding=1)))

    def forward(self, crop: torch.Tensor, mask: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([crop, mask, sketch], dim=1))


def image_gradients(x: torch.Tensor) -> typing.Tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical differences of `(B, C, H, W)`, each padded back to `(B, C, H, W)`."""
    dx = nn.functional.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    dy = nn.functional.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def region_l1(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((a - b).abs() * mask).sum() / (mask.sum() * a.shape[1]).clamp(min=1)


def sharpness_ratio(x0: np.ndarray, clean: np.ndarray, region: np.ndarray) -> float:
    """Mean over the batch of `avatar.metrics.sharpness` in the region, output / real (crops
    `(B, 3, S, S)` in [-1, 1], region `(B, 1, S, S) bool`)."""
    return float(np.mean([sharpness(from_unit(out), inside) / max(sharpness(from_unit(real), inside), 1e-9)
                          for out, real, inside in zip(x0, clean, region[:, 0])]))


def main(argv: typing.Optional[typing.Sequence[str]] = None) -> int:
    import argparse

    from avatar.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="python -m training.distill_render", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--teacher", type=pathlib.Path, required=True, help="the many-step model (assets/render.pt or a training checkpoint)")
    parser.add_argument("--init", type=pathlib.Path, help="start the student from these weights, a checkpoint or an exported .onnx "
                        "(default: the teacher's; one with fewer retrieved references is widened, `with_retrieved`)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    add_config_arguments(parser, DistillConfig, "")
    parser.add_argument("--model.steps", dest="student_steps", type=int, default=RenderConfig().steps,
                        help="sampling steps the student is trained for (its times also serve the samplers with fewer steps that divide it)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, DistillConfig, "")
    rank, world, device = start_process(cfg.threads, cfg.seed)
    main_process = rank == 0

    # 1. Teacher (frozen), student (a copy of it, sampled in `student_steps`), weight average, discriminator.
    loaded = {}
    for role, path in (("teacher", args.teacher), ("student", args.init or args.teacher)):
        try:
            loaded[role] = load_denoiser(path)
        except (OSError, KeyError, RuntimeError) as error:
            print(f"error: cannot load the {role} {path}: {error}", file=sys.stderr)
            return 2
    if loaded["student"].config.retrieved < loaded["teacher"].config.retrieved:  # a student without the new references: widened
        loaded["student"] = with_retrieved(loaded["student"], dataclasses.replace(loaded["student"].config, retrieved=loaded["teacher"].config.retrieved))
    if not same_architecture(loaded["student"].config, loaded["teacher"].config):
        print(f"error: {args.init} is a model of another shape than the teacher {args.teacher}", file=sys.stderr)
        return 2
    model_cfg = dataclasses.replace(loaded["teacher"].config, steps=args.student_steps)
    teacher = loaded["teacher"].to(device).eval().requires_grad_(False)
    student = Denoiser(model_cfg).to(device).to(memory_format=torch.channels_last)
    student.load_state_dict(loaded["student"].state_dict())
    average = Denoiser(model_cfg).to(device)
    average.load_state_dict(student.state_dict())
    average.requires_grad_(False)
    discriminator = PatchDiscriminator().to(device)
    optimiser = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.5, 0.99), weight_decay=0.0)
    optimiser_d = torch.optim.AdamW(discriminator.parameters(), lr=cfg.lr_discriminator, betas=(0.5, 0.99), weight_decay=0.0)
    start_step = 0
    if args.resume and (args.out / "last.pt").exists():
        state = torch.load(args.out / "last.pt", map_location="cpu", weights_only=False)
        student.load_state_dict(state["raw"])
        average.load_state_dict(state["model"])
        discriminator.load_state_dict(state["discriminator"])
        optimiser.load_state_dict(state["optimiser"])
        optimiser_d.load_state_dict(state["optimiser_d"])
        start_step = state["step"]
    trainable = DistributedDataParallel(student) if world > 1 else student
    judge = DistributedDataParallel(discriminator) if world > 1 else discriminator
    last_layer = student.out[-1].weight

    # 2. Data: the training people; a fixed held-out batch of validation people.
    train_clips = load_render_clips(args.cache, "train", model_cfg.crop_size, cfg.every)
    val_clips = load_render_clips(args.cache, "val", model_cfg.crop_size, max(cfg.every, 4))
    if not train_clips:
        print(f"error: no usable training clips in {args.cache}; run training.preprocess first", file=sys.stderr)
        return 2
    sampler = RenderSampler(train_clips, model_cfg, seed=cfg.seed * 1000 + rank + 77)
    val_batch = RenderSampler(val_clips or train_clips, model_cfg, augment=False, seed=12345).batch(cfg.val_samples)
    student_times = timesteps(model_cfg.steps)[:-1].astype(np.float32)  # 1, 0.75, 0.5, 0.25 for 4 steps
    draft_times = student_times[student_times <= cfg.draft_max_time + 1e-6]
    if cfg.draft_share > 0 and draft_times.size == 0:
        print(f"error: no student time is at or below --draft-max-time {cfg.draft_max_time}", file=sys.stderr)
        return 2

    writer = None
    if main_process:
        (args.out / "samples").mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.out / "tb"))
        (args.out / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg),
                                                          "teacher": str(args.teacher)}, indent=1))
        print(f"{len(train_clips)} training clips, {len(val_clips)} held-out clips; student times {student_times.tolist()}"
              + (f", from the warp's draft at {draft_times.tolist()} for {cfg.draft_share:.0%} of samples" if cfg.draft_share > 0 else "")
              + f"; {world} process(es) on {device}", flush=True)
        if start_step == 0:
            psnr, x0_val = validate(average, val_batch, device, model_cfg.steps)
            sharp = sharpness_ratio(x0_val, val_batch["clean"], val_batch["condition"][:, 3:4] > 0.5)
            print(f"val step 0 (the student's start in {model_cfg.steps} steps): region PSNR {psnr:.2f} dB, sharpness {sharp:.2f}", flush=True)

    # 3. The loop.
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 7 * rank)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    cl = lambda x: x.contiguous(memory_format=torch.channels_last)
    batches = batch_stream(sampler, cfg.batch, cfg.draft_share, cfg.workers, seed=cfg.seed * 1000 + rank + 77)
    done = 0
    for step in range(start_step, cfg.steps):
        last = step == cfg.steps - 1 or time_is_up(started, cfg.minutes, world, device)
        student.train()
        batch = next(batches)
        clean = torch.from_numpy(batch["clean"]).to(device)
        condition = torch.from_numpy(batch["condition"]).to(device)
        mask = torch.from_numpy(batch["mask"]).to(device)
        sketch = condition[:, -3:]
        patch_mask = nn.functional.avg_pool2d(mask, 8)  # which discriminator patches see the repainted region

        # 3a. The student's clean crop from the noisy real crop (or the warp's draft of it) at one of its sampling times.
        times = rng.choice(student_times, cfg.batch)
        source = clean
        if cfg.draft_share > 0:
            times = np.where(batch["has_draft"], rng.choice(draft_times, cfg.batch), times).astype(np.float32)
            source = torch.from_numpy(batch["draft"]).to(device)  # the clean crop where a sample has no draft
        alpha, sigma = noise_levels(times, device)
        x_t = noised(source, torch.randn_like(clean), alpha, sigma)
        with autocast():
            v = trainable(cl(x_t), torch.from_numpy(times).to(device), cl(condition)).float()
        x0 = clean_from_v(x_t, v, alpha, sigma).clamp(-1, 1)
        composite = x0 * mask + clean * (1 - mask)

        # 3b. Losses: reconstruction, distillation through the teacher, adversarial.
        reconstruction = region_l1(x0, clean, mask) + cfg.gradient_weight * sum(
            region_l1(a, b, mask) for a, b in zip(image_gradients(x0), image_gradients(clean)))
        s = rng.uniform(0.02, 0.98, cfg.batch).astype(np.float32)
        alpha_s, sigma_s = noise_levels(s, device)
        renoised = noised(x0.detach(), torch.randn_like(x0), alpha_s, sigma_s)
        with torch.no_grad(), autocast():
            teacher_v = teacher(cl(renoised), torch.from_numpy(s).to(device), cl(condition)).float()
        teacher_x0 = clean_from_v(renoised, teacher_v, alpha_s, sigma_s).clamp(-1, 1)
        distillation = (((x0 - teacher_x0).abs() * mask).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * 3).clamp(min=1)
                        * alpha_s.flatten() ** 2).mean()
        loss = reconstruction + cfg.distill_weight * distillation
        adversarial_weight = 0.0
        if step >= cfg.adversarial_start:
            discriminator.requires_grad_(False)  # the student's step leaves the discriminator's gradients alone
            fake_logits = discriminator(composite, mask, sketch)
            adversarial = -(fake_logits * patch_mask).sum() / patch_mask.sum().clamp(min=1e-6)
            grad_rec = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)[0]
            grad_adv = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
            adversarial_weight = float((grad_rec.norm() / (grad_adv.norm() + 1e-4)).clamp(0, 1e3)) * cfg.adversarial
            loss = loss + adversarial_weight * adversarial
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimiser.step()
        update_average(average, student, min(cfg.ema, (1.0 + step) / (10.0 + step)))

        # 3c. The discriminator: real crops against the student's composites (hinge), on the patches of the region.
        discriminator.requires_grad_(True)
        real_logits, fake_logits = judge(torch.cat([clean, composite.detach()]), mask.repeat(2, 1, 1, 1),
                                         sketch.repeat(2, 1, 1, 1)).chunk(2)  # one call: one DDP forward per backward
        d_loss = ((torch.relu(1 - real_logits) + torch.relu(1 + fake_logits)) * patch_mask).sum() / patch_mask.sum().clamp(min=1e-6)
        optimiser_d.zero_grad(set_to_none=True)
        d_loss.backward()
        optimiser_d.step()

        if main_process and (step % 25 == 0 or last):
            log_training(writer, step, {"reconstruction": reconstruction, "distillation": distillation, "discriminator": d_loss,
                                        "adversarial_weight": adversarial_weight}, (step + 1 - start_step) / (time.perf_counter() - started))

        # 4. Validation on held-out people; sample grid; snapshots of the average.
        if main_process and ((step + 1) % cfg.val_every == 0 or last):
            average.eval()
            psnr, x0_val = validate(average, val_batch, device, model_cfg.steps)
            sharp = sharpness_ratio(x0_val, val_batch["clean"], val_batch["condition"][:, 3:4] > 0.5)
            writer.add_scalar("val/mouth_psnr", psnr, step)
            writer.add_scalar("val/sharpness_ratio", sharp, step)
            save_grid(args.out / "samples" / f"step{step + 1:06d}.png", val_batch, x0_val)
            print(f"val step {step + 1}: region PSNR {psnr:.2f} dB, sharpness {sharp:.2f} ({model_cfg.steps} steps)", flush=True)
            snapshot = {"model": average.state_dict(), "step": step + 1, "model_config": dataclasses.asdict(model_cfg),
                        "train_config": dataclasses.asdict(cfg), "val_psnr": psnr, "val_sharpness": sharp}
            save_checkpoint(args.out / f"step{step + 1:06d}.pt", **snapshot)
            save_checkpoint(args.out / "last.pt", **snapshot, raw=student.state_dict(), discriminator=discriminator.state_dict(),
                            optimiser=optimiser.state_dict(), optimiser_d=optimiser_d.state_dict())
            writer.flush()
        done += 1
        if last:
            break
    del trainable, judge  # the DDP wrappers and their reducers go before the process group
    finish_training(world, writer, done, time.perf_counter() - started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
