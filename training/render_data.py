"""Training data for the renderer, from the preprocessing cache (talking and silent videos alike:
the renderer learns landmarks → pixels and needs no audio).

Each sample: a target crop; the repaint mask (the union of the lower-face masks of the target frame
and of another frame of the clip, as in dubbing, where the mask must cover both the old and the new
jaw); two references from the same clip at least `REFERENCE_GAP` frames away (a closed and an open
mouth); with `RenderConfig.retrieved` > 0, that many more, retrieved as the engine retrieves them
from a person's mouth bank (`MouthBank.references`): from a bank of BANK_SIZE (an enrolled bank's
size, `avatar.enroll`) frames of the clip at least `REFERENCE_GAP` frames away, the one whose lips
lie nearest the target's and its nearest in shape; in NO_BANK_SHARE of the samples the references
again instead (a person without a bank); the sketch of the target's lips and jaw. Augmentation: horizontal flip of everything,
brightness/contrast applied to target and references alike.
"""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import torch.utils.data

from avatar.config import AlignConfig, RenderConfig
from avatar.enroll import BANK_SIZE
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner
from avatar.render.condition import build_condition, composite, to_unit
from avatar.render.retrieval import lip_shape, shape_neighbours
from avatar.render.warp import InnerMouth, render_warp
from training.cache import ClipCache, open_cache

REFERENCE_GAP = 12  # frames between a target and its references
NO_BANK_SHARE = 0.25  # samples whose retrieved references are the references again (no bank)


@dataclasses.dataclass
class RenderClip:
    """crops `(T, S, S, 3) uint8`; landmarks `(T, 478, 2)` crop pixels; usable `(T,) bool`; gap `(T,)`."""

    clip_id: str
    person: str
    crops: np.ndarray
    landmarks: np.ndarray
    usable: np.ndarray
    gap: np.ndarray

    def references(self, index: int, rng: np.random.Generator, count: int) -> typing.List[int]:
        """Reference frames for target `index`: the first from the most-closed third of the usable
        frames, the next from the most-open third, ..., all at least REFERENCE_GAP frames away."""
        far = self.usable & (np.abs(np.arange(self.usable.size) - index) >= REFERENCE_GAP)
        pool = np.flatnonzero(far) if far.any() else np.flatnonzero(self.usable)
        order = pool[np.argsort(self.gap[pool])]
        thirds = [order[: max(1, len(order) // 3)], order[-max(1, len(order) // 3):]]
        return [int(rng.choice(thirds[k % 2])) for k in range(count)]

    def bank(self, rng: np.random.Generator, away_from: typing.Sequence[int]) -> np.ndarray:
        """A mouth bank: up to BANK_SIZE usable frames `(N,) int64`, each at least REFERENCE_GAP from
        every frame of `away_from` (all usable frames if none is)."""
        frames = np.arange(self.usable.size)
        far = self.usable & (np.abs(frames[:, None] - np.asarray(away_from)[None]) >= REFERENCE_GAP).all(axis=1)
        pool = np.flatnonzero(far) if far.any() else np.flatnonzero(self.usable)
        return np.sort(rng.choice(pool, min(BANK_SIZE, pool.size), replace=False))

    def retrieved(self, index: int, rng: np.random.Generator, count: int, bank: typing.Optional[np.ndarray] = None) -> typing.List[int]:
        """`count` retrieved reference frames for target `index`: of a `bank` (default: a new one away
        from the target), the entry nearest the target's lips, then that entry's nearest in shape
        (`shape_neighbours`, as `MouthBank.references`)."""
        bank = self.bank(rng, [index]) if bank is None else bank
        shapes = lip_shape(self.landmarks[bank][:, lm.MOUTH_AND_JAW, :2])
        target = lip_shape(self.landmarks[index][lm.MOUTH_AND_JAW, :2])
        first = int(np.argmin(((shapes - target) ** 2).sum(-1).mean(-1)))
        return [int(bank[k]) for k in shape_neighbours(shapes, first, count)]


def render_clip(cache: ClipCache, crop_size: int, every: int = 1, min_usable: int = 2 * REFERENCE_GAP) -> typing.Optional[RenderClip]:
    usable = cache.keep.copy()
    if int(usable.sum()) < min_usable:
        return None
    landmarks = cache.landmarks(crop_size)
    crops = cache.crops(crop_size)
    if crops.shape[0] != usable.size:
        return None
    frames = np.arange(0, usable.size, every)
    landmarks, crops, usable = landmarks[frames], crops[frames], usable[frames] & np.isfinite(landmarks[frames]).all(axis=(1, 2))
    gap = np.nan_to_num(lm.mouth_opening(landmarks), nan=0.0)
    return RenderClip(cache.clip_id, cache.meta["person"], crops, landmarks.astype(np.float32), usable, gap)


def load_render_clips(cache_root, split: str, crop_size: int = 128, every: int = 1,
                      kinds: typing.Sequence[str] = ("video", "video_silent")) -> typing.List[RenderClip]:
    clips = []
    for kind in kinds:
        for cache in open_cache(cache_root, split=split, kind=kind):
            clip = render_clip(cache, crop_size, every)
            if clip is not None:
                clips.append(clip)
    return clips


def make_sample(clip: RenderClip, index: int, rng: np.random.Generator, config: RenderConfig, aligner: FaceAligner,
                augment: bool, draft: bool = False) -> typing.Tuple[np.ndarray, ...]:
    """(clean target `(3, S, S)` in [-1, 1], condition `(C, S, S)`, repaint mask `(1, S, S)` in [0, 1])
    and, with `draft`, the warp renderer's draft of the target `(3, S, S)` in [-1, 1]: the first
    reference's lower face (the first retrieved one's, with a bank) warped to the target's lips and
    jaw, the inside of the mouth from the open reference, composited into the target outside the
    mask (what the pipeline refines)."""
    other = int(rng.choice(np.flatnonzero(clip.usable)))
    mask = aligner.repaint_mask(clip.landmarks[index], clip.landmarks[other])
    chosen = clip.references(index, rng, config.references)
    from_bank = bool(config.retrieved) and rng.random() >= NO_BANK_SHARE
    if config.retrieved:
        chosen += (clip.retrieved(index, rng, config.retrieved) if from_bank else [chosen[k % len(chosen)] for k in range(config.retrieved)])
    refs = [clip.crops[i] for i in chosen]
    target = clip.crops[index]
    if augment:
        gain, bias = rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
        adjust = lambda image: np.clip(image.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
        target, refs = adjust(target), [adjust(r) for r in refs]
    condition = build_condition(target, mask, refs, clip.landmarks[index][lm.MOUTH_AND_JAW])
    arrays = [to_unit(target), condition, mask[None].astype(np.float32)]
    if draft:
        # the lower face of the first reference (with a bank: of the retrieved entry, as the retrieval
        # renderer draws it), the inside of the mouth from the open reference
        source = config.references if from_bank else 0
        opened = config.references - 1
        inside = InnerMouth(refs[opened], clip.landmarks[chosen[opened]][lm.MOUTH_AND_JAW, :2], config.crop_size)
        warped = render_warp(refs[source], clip.landmarks[chosen[source]], clip.landmarks[index][lm.MOUTH_AND_JAW, :2], mask, inside)
        arrays.append(to_unit(composite(warped, target, mask)))
    if augment and rng.random() < 0.5:
        arrays = [a[..., ::-1] for a in arrays]
    return tuple(np.ascontiguousarray(a) for a in arrays)


class RenderSampler:
    """`batch(n)` → clean `(n, 3, S, S)`, condition `(n, C, S, S)`, mask `(n, 1, S, S)` (all float32)."""

    def __init__(self, clips: typing.Sequence[RenderClip], config: RenderConfig, augment: bool = True, seed: int = 0):
        if not clips:
            raise ValueError("no clips with enough usable frames for the renderer")
        self.clips, self.config, self.augment = list(clips), config, augment
        self.rng = np.random.default_rng(seed)
        self.aligner = FaceAligner(AlignConfig(crop_size=config.crop_size))
        weights = np.array([c.usable.sum() for c in self.clips], np.float64)
        self.weights = weights / weights.sum()

    def batch(self, size: int, draft_share: float = 0.0) -> typing.Dict[str, np.ndarray]:
        """With `draft_share` > 0, also "draft" `(n, 3, S, S)` (the warp renderer's draft for about that
        share of the samples, the clean crop for the others) and "has_draft" `(n,) bool`."""
        items, has_draft = [], self.rng.random(size) < draft_share
        for k in range(size):
            clip = self.clips[self.rng.choice(len(self.clips), p=self.weights)]
            index = int(self.rng.choice(np.flatnonzero(clip.usable)))
            items.append(make_sample(clip, index, self.rng, self.config, self.aligner, self.augment, bool(has_draft[k])))
        batch = {"clean": np.stack([i[0] for i in items]), "condition": np.stack([i[1] for i in items]),
                 "mask": np.stack([i[2] for i in items])}
        if draft_share > 0:
            batch["draft"] = np.stack([i[3] if len(i) > 3 else i[0] for i in items])
            batch["has_draft"] = has_draft
        return batch


class SamplerBatches(torch.utils.data.IterableDataset):
    """An endless iterable of `sampler.batch(size, draft_share)` for a torch DataLoader; each worker
    draws from its own random stream."""

    def __init__(self, sampler: RenderSampler, size: int, draft_share: float, seed: int):
        self.sampler, self.size, self.draft_share, self.seed = sampler, size, draft_share, seed

    def __iter__(self) -> typing.Iterator[typing.Dict[str, np.ndarray]]:
        info = torch.utils.data.get_worker_info()
        self.sampler.rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            yield self.sampler.batch(self.size, self.draft_share)


def batch_stream(sampler: RenderSampler, size: int, draft_share: float = 0.0, workers: int = 0,
                 seed: int = 0) -> typing.Iterator[typing.Dict[str, np.ndarray]]:
    """Endless training batches (`RenderSampler.batch`). `workers` > 0: made ahead in that many
    processes (what keeps a GPU fed; sampling takes about 4 ms a crop on one core), else in this one."""
    if workers <= 0:
        while True:
            yield sampler.batch(size, draft_share)
    loader = torch.utils.data.DataLoader(SamplerBatches(sampler, size, draft_share, seed), batch_size=None,
                                         num_workers=workers, prefetch_factor=4, persistent_workers=True)
    for batch in loader:
        yield {k: v.numpy() for k, v in batch.items()}
