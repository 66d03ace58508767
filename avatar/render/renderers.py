"""The renderers behind `FaceRenderer` (`avatar/render/base.py`), chosen by `PipelineConfig.renderer`:

- "retrieval" (default, `RetrievalRenderer`): the warp renderer, with the lips and the inside of the
  mouth then drawn from the person's own enrolled mouth closest to each target, warped the rest of
  the way (`avatar/render/retrieval.py`); the same as the warp for a person without a bank;
- "warp" (`WarpRenderer`): moves the person's own pixels to the target mouth
  (`avatar/render/warp.py`), on a crop at the face's own resolution;
- "diffusion" (`DiffusionRenderer`): conditions the learned denoiser on the masked crop, the mask,
  the person's reference crops and the mouth sketch, and runs a few DDIM steps with noise that is the
  same for every frame (so a still target does not flicker); by default it refines the warp
  renderer's frame (its crop noised to `diffusion_start`), or draws from pure noise (1.0). Then it
  matches the repainted region's colour to the crop, and gives the region back the fine detail of
  the frame (or of the warp renderer's frame it refined) where it agrees with the rendering (a face
  larger than the crop would otherwise come back smoother than its surroundings).

The step numbers in comments are those of `avatar/render/base.py`.
"""

from __future__ import annotations

import os
import typing
import weakref

import numpy as np

from avatar import provenance
from avatar.config import AlignConfig, PipelineConfig
from avatar.errors import AvatarError
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, FaceRegion, crop_template, rescale_points, rescale_transform, transform_scale
from avatar.render.base import FaceRenderer, FrameJob, FramePool, Identity, RenderBatch
from avatar.render.condition import build_condition, colour_match, from_unit, to_unit, transfer_detail
from avatar.render.warp import InnerMouth, render_warp

RENDER_MODEL = "render.onnx"
# Detail transfer after the diffusion renderer (luma levels of coarse disagreement that stop it): from
# the input frame only where the mouth did not move; from the warp renderer's frame that the model
# refined, much more freely (its pixels are the person's, already at the target mouth). Measured (teacher model) on
# two held-out dubs: sharpness ratio 0.44 → 0.62 and 0.62 → 0.74 from 10 to 30 levels.
FRAME_DETAIL_TOLERANCE, DRAFT_DETAIL_TOLERANCE = 10.0, 30.0


def dissolve(shown: FaceRegion, faded: FaceRegion) -> FaceRegion:
    """Two renderings of one frame's region (with two bank entries) shown half and half: the mean of
    their `pixels` (rounded), the larger of their `alpha`; `shown` itself where the two regions are
    not the same box."""
    if (shown.top, shown.left, shown.pixels.shape) != (faded.top, faded.left, faded.pixels.shape):
        return shown
    pixels = ((shown.pixels.astype(np.uint16) + faded.pixels + 1) // 2).astype(np.uint8)
    return FaceRegion(shown.top, shown.left, pixels, np.maximum(shown.alpha, faded.alpha))


def frame_references(identity: Identity, entry: typing.Optional[int], count: int, retrieved: int, size: int) -> typing.List[np.ndarray]:
    """The crops `(size, size, 3) uint8` a frame is conditioned on: `count` of the person's
    references (repeated if they have fewer), then `retrieved` mouths of their bank, the frame's
    `entry` first and then its nearest in lip shape (`MouthBank.references`), or, without a bank or
    entry, the person's references again (as the model saw in training, `NO_BANK_SHARE` of
    `training.render_data`)."""
    if not identity.references:
        raise AvatarError("this person was prepared without the diffusion renderer's reference crops (an avatar "
                          "enrolled before 2026-11-30); enroll again")
    references = [identity.references[k % len(identity.references)] for k in range(count)]
    if retrieved and identity.bank is not None and entry is not None:
        return references + identity.bank.references(entry, retrieved, size)
    return references + [references[k % len(references)] for k in range(retrieved)]


class Aligners:
    """`FaceAligner`s by crop side, made once each."""

    def __init__(self):
        self._by_size: typing.Dict[int, FaceAligner] = {}

    def __call__(self, size: int) -> FaceAligner:
        if size not in self._by_size:
            self._by_size[size] = FaceAligner(AlignConfig(crop_size=size))
        return self._by_size[size]


class WarpRenderer:
    """The person's own pixels moved to the target mouth, on a crop at the face's own resolution (a
    multiple of 16 between `crop_size` and `config.warp_max_size`). Needs no model and no references."""

    name = "warp"
    model_files: typing.Tuple[str, ...] = ()
    references = 0

    def __init__(self, config: PipelineConfig = PipelineConfig(), crop_size: int = AlignConfig.crop_size,
                 pool: typing.Optional[FramePool] = None):
        self.config, self.crop_size = config, crop_size
        self.pool = pool or FramePool(config.workers)
        self.aligners = Aligners()

    def render(self, batch: RenderBatch) -> typing.List[typing.Optional[FaceRegion]]:
        entries, fades = self.choose_and_fades(batch)
        regions: typing.List[typing.Optional[FaceRegion]] = [None] * len(batch)
        faces = batch.faces
        rows = [(i, entries[i]) for i in faces] + [(i, fades[i]) for i in faces if fades[i] is not None]
        rendered = self.pool.map(lambda row: self.render_one(batch.jobs[row[0]], batch.identities[row[0]], int(batch.frame_indices[row[0]]),
                                                             entry=row[1]), rows)
        for (i, _), region in zip(rows, rendered):
            regions[i] = region if regions[i] is None else dissolve(regions[i], region)
        return regions

    def choose(self, batch: RenderBatch) -> typing.List[typing.Optional[int]]:
        """The mouth-bank entry each job draws from (None: none, the person's own open mouth)."""
        return [None] * len(batch)

    def choose_and_fades(self, batch: RenderBatch) -> typing.Tuple[typing.List[typing.Optional[int]], typing.List[typing.Optional[int]]]:
        """(`choose`, the entry each job's frame also shows half and half, `dissolve`; None: none)."""
        return self.choose(batch), [None] * len(batch)

    def inner_for(self, identity: Identity, entry: typing.Optional[int]) -> InnerMouth:
        """The open mouth the inside of the mouth is composed from: the person's own."""
        return identity.inner

    def draw(self, crop: np.ndarray, landmarks: np.ndarray, mouth: np.ndarray, mask: np.ndarray, identity: Identity,
             entry: typing.Optional[int]) -> np.ndarray:
        """Step 4 on a crop of side S `(S, S, 3) uint8` with its `landmarks (478, 2)`, to the target
        `mouth (59, 2)` (both in its pixels) under the repaint `mask (S, S)`: `(S, S, 3) uint8`."""
        return render_warp(crop, landmarks, mouth, mask, self.inner_for(identity, entry).at(crop.shape[0]))

    def render_one(self, job: FrameJob, identity: Identity, frame_index: int, watermark: bool = True,
                   entry: typing.Optional[int] = None) -> FaceRegion:
        """Steps 1-6 for one frame; `watermark=False` for a draft; `entry`: the person's mouth-bank
        entry to draw from (`choose`)."""
        native = self.crop_size / transform_scale(job.transform)
        size = int(np.clip(16 * round(native / 16), self.crop_size, max(self.crop_size, self.config.warp_max_size)))
        aligner = self.aligners(size)
        transform = rescale_transform(job.transform, self.crop_size, size)
        crop = aligner.crop(job.frame, transform)  # 1.
        landmarks = rescale_points(np.asarray(job.crop_landmarks)[:, :2], self.crop_size, size)
        mouth = rescale_points(job.mouth, self.crop_size, size)  # 2.
        mask = aligner.repaint_mask(landmarks, lm.with_mouth(landmarks, mouth))  # 3.
        face = self.draw(crop, landmarks, mouth, mask, identity, entry)  # 4.
        if self.config.watermark and watermark:  # 5.
            face = provenance.embed_watermark(face, mask, frame_index)
        sigma = 0.7 / transform_scale(transform)  # a crop pixel, in frame pixels
        if not self.config.detail or sigma < 0.75:  # the crop is at the face's own resolution
            return aligner.paste_region(job.frame, face, transform, mask)  # 6.
        # a face larger than `warp_max_size`: the frame's own fine detail back where the mouth did not move
        region = aligner.paste_region(job.frame, face, transform, mask, pad=int(3 * sigma) + 2)
        region.pixels = transfer_detail(job.frame[region.box], region.pixels, region.alpha, sigma, FRAME_DETAIL_TOLERANCE)
        return region

    def warm_up(self, batch: int) -> None:
        """The first call loads the spline's linear algebra."""
        face = crop_template(self.crop_size)
        crop = np.full((self.crop_size, self.crop_size, 3), 128, np.uint8)
        render_warp(crop, face, face[lm.MOUTH_AND_JAW], self.aligners(self.crop_size).lower_face_mask(face), InnerMouth(None, None))


class RetrievalRenderer(WarpRenderer):
    """The warp renderer, then the person's bank entry chosen for the frame (`FrameJob.bank_index`, a
    whole file's Viterbi path, or, for a stream's jobs that carry none, the entry `MouthBank.follow`
    picks; each stream's last choice is kept between calls, `FrameJob.stream`, or each person's for
    jobs without one) warped to the target mouth and blended
    over the lips and the inside of the mouth (`MouthBank.draw`). A person without a bank renders as
    with the warp renderer."""

    name = "retrieval"

    def __init__(self, config: PipelineConfig = PipelineConfig(), crop_size: int = AlignConfig.crop_size,
                 pool: typing.Optional[FramePool] = None):
        super().__init__(config, crop_size, pool)
        # the last entry drawn, by stream (`FrameJob.stream`) or, for jobs without one, by person (their bank)
        self._last: "weakref.WeakKeyDictionary[typing.Any, typing.Optional[int]]" = weakref.WeakKeyDictionary()

    def choose(self, batch: RenderBatch) -> typing.List[typing.Optional[int]]:
        """The bank entry of each job (None: no bank, or no face)."""
        return self.choose_and_fades(batch)[0]

    def choose_and_fades(self, batch: RenderBatch) -> typing.Tuple[typing.List[typing.Optional[int]], typing.List[typing.Optional[int]]]:
        """The bank entry of each job (None: no bank, or no face), and the entry its frame also shows
        half and half (`dissolve`): the person's previous entry where the entry changes while the
        target mouth is open (`MouthBank.switch_costs` > 0; a change while the lips are closed is not
        seen), so that the change is a one-frame dissolve instead of a pop; None elsewhere."""
        chosen: typing.List[typing.Optional[int]] = [None] * len(batch)
        fades: typing.List[typing.Optional[int]] = [None] * len(batch)
        for i in batch.faces:
            job, bank = batch.jobs[i], batch.identities[i].bank
            if bank is None:
                continue
            stream = bank if job.stream is None else job.stream
            previous = self._last.get(stream)
            if job.bank_index is not None:
                chosen[i] = int(job.bank_index) if job.bank_index >= 0 else None  # NONE: no entry near the face's pose
            else:
                chosen[i] = bank.follow(job.mouth, previous, job.crop_landmarks)
            if None not in (chosen[i], previous) and chosen[i] != previous and bank.switch_costs(np.asarray(job.mouth)[None])[0] > 0:
                fades[i] = previous
            self._last[stream] = chosen[i]
        return chosen, fades

    def inner_for(self, identity: Identity, entry: typing.Optional[int]) -> InnerMouth:
        """The entry's open mouth (`MouthBank.inner`), or the person's own without one."""
        return identity.inner if entry is None else identity.bank.inner(entry)

    def draw(self, crop: np.ndarray, landmarks: np.ndarray, mouth: np.ndarray, mask: np.ndarray, identity: Identity,
             entry: typing.Optional[int]) -> np.ndarray:
        face = super().draw(crop, landmarks, mouth, mask, identity, entry)
        return face if entry is None else identity.bank.draw(entry, face, landmarks, mouth)


class DiffusionRenderer:
    """The learned denoiser (`render.onnx` in the model folder) on the canonical crop; see the module
    docstring. `config.diffusion_start` < 1 refines the warp renderer's frame."""

    name = "diffusion"
    model_files = (RENDER_MODEL,)

    def __init__(self, folder: typing.Union[str, os.PathLike], config: PipelineConfig = PipelineConfig(),
                 crop_size: int = AlignConfig.crop_size, providers: typing.Optional[typing.Sequence[str]] = None,
                 pool: typing.Optional[FramePool] = None):
        from avatar.render.runner import OnnxDenoiser
        from avatar.render.sampling import steps_from

        path = os.path.join(folder, RENDER_MODEL)
        self.denoiser = OnnxDenoiser(path, threads=config.threads, providers=providers, fp16=config.fp16)
        if self.denoiser.config.crop_size != crop_size:
            raise AvatarError(f"{path}: renders {self.denoiser.config.crop_size}² crops; this pipeline aligns to {crop_size}²")
        self.config, self.crop_size = config, crop_size
        self.pool = pool or FramePool(config.workers)
        self.references, self.retrieved = self.denoiser.config.references, self.denoiser.config.retrieved
        self.steps = config.steps or steps_from(config.diffusion_start, self.denoiser.config.steps)
        self.noise = np.random.default_rng(config.seed).standard_normal((3, crop_size, crop_size)).astype(np.float32)
        self.aligner = FaceAligner(AlignConfig(crop_size=crop_size))
        # the draft and the choice of bank entries: the retrieval renderer (the warp for a person without a bank)
        self.draft = RetrievalRenderer(config, crop_size, self.pool)

    def render(self, batch: RenderBatch) -> typing.List[typing.Optional[FaceRegion]]:
        faces = batch.faces
        regions: typing.List[typing.Optional[FaceRegion]] = [None] * len(batch)
        if not faces:
            return regions
        start = self.config.diffusion_start
        entries = self.draft.choose(batch)

        def prepare(i: int) -> typing.Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, typing.Optional[np.ndarray]]:
            job = batch.jobs[i]
            crop = self.aligner.crop(job.frame, job.transform)  # 1.
            mask = self.aligner.repaint_mask(job.crop_landmarks, lm.with_mouth(job.crop_landmarks, job.mouth))  # 2., 3.
            references = frame_references(batch.identities[i], entries[i], self.references, self.retrieved, self.crop_size)
            condition = build_condition(crop, mask, references, job.mouth)  # 4.
            if start >= 1:
                return crop, mask, condition, job.frame, None
            # the draft: the retrieval (or warp) renderer's frame, at the face's own resolution, cropped
            warped = self.draft.render_one(job, batch.identities[i], int(batch.frame_indices[i]), watermark=False,
                                           entry=entries[i]).place(job.frame)
            return crop, mask, condition, warped, to_unit(self.aligner.crop(warped, job.transform))

        prepared = self.pool.map(prepare, faces)
        noise = np.broadcast_to(self.noise, (len(faces), *self.noise.shape)).copy()
        drafts = np.stack([p[4] for p in prepared]) if start < 1 else None
        rendered = self.denoiser.sample(np.stack([p[2] for p in prepared]), noise, self.steps, init=drafts, start=start)

        def finish(k: int) -> FaceRegion:
            i, (crop, mask, _, source, _) = faces[k], prepared[k]
            job = batch.jobs[i]
            face = from_unit(rendered[k])
            if self.config.colour_match > 0:  # 5.
                face = colour_match(face, crop, mask, self.config.colour_match)
            if self.config.watermark:
                face = provenance.embed_watermark(face, mask, int(batch.frame_indices[i]))
            if not self.config.detail:
                return self.aligner.paste_region(job.frame, face, job.transform, mask)  # 6.
            sigma = 0.7 / transform_scale(job.transform)  # a crop pixel, in frame pixels
            region = self.aligner.paste_region(job.frame, face, job.transform, mask, pad=int(3 * sigma) + 2)
            tolerance = FRAME_DETAIL_TOLERANCE if start >= 1 else DRAFT_DETAIL_TOLERANCE
            region.pixels = transfer_detail(source[region.box], region.pixels, region.alpha, sigma, tolerance)
            return region

        for i, region in zip(faces, self.pool.map(finish, range(len(faces)))):
            regions[i] = region
        return regions

    def warm_up(self, batch: int) -> None:
        """The provider's lazy set-up (graph building, CUDA/TensorRT kernels), and the draft's."""
        size, channels = self.crop_size, self.denoiser.config.condition_channels
        self.denoiser.sample(np.zeros((batch, channels, size, size), np.float32), np.zeros((batch, 3, size, size), np.float32), steps=1)
        if self.config.diffusion_start < 1:
            self.draft.warm_up(batch)


RENDERERS = ("retrieval", "warp", "diffusion")


def make_renderer(config: PipelineConfig, folder: typing.Union[str, os.PathLike], crop_size: int = AlignConfig.crop_size,
                  providers: typing.Optional[typing.Sequence[str]] = None, pool: typing.Optional[FramePool] = None) -> FaceRenderer:
    """The renderer `config.renderer` names, with the models of `folder` (through the frame graph with
    `config.frame_graph`)."""
    if config.frame_graph and config.renderer in RENDERERS:
        from avatar.render.graph import GraphRenderer

        return GraphRenderer(folder, config, crop_size, providers, pool)
    if config.renderer == "retrieval":
        return RetrievalRenderer(config, crop_size, pool)
    if config.renderer == "warp":
        return WarpRenderer(config, crop_size, pool)
    if config.renderer == "diffusion":
        return DiffusionRenderer(folder, config, crop_size, providers, pool)
    raise AvatarError(f"renderer must be one of {', '.join(RENDERERS)}, not {config.renderer!r}")
