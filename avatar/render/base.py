"""The renderer interface: what every renderer takes (a batch of frame jobs) and gives back (the
finished face region of each frame), and the person state it renders.

    renderer = make_renderer(config, models_folder)        # "retrieval", "warp", "diffusion" (PipelineConfig.renderer)
    regions = renderer.render(RenderBatch(jobs, identities, frame_indices))
    frame = regions[i].place(jobs[i].frame) if regions[i] is not None else jobs[i].frame

Every renderer does the same numbered steps for each frame of the batch:
1. crop the face at the frame's alignment transform;
2. take the target mouth (the motion model's lips and jaw, placed at the frame's mouth anchor, in
   the job);
3. build the repaint mask: the lower face as it is ∪ as it will be (the old jaw must go, the new
   one fits);
4. draw the lower face to the target mouth (its own way: `avatar/render/renderers.py`);
5. colour matching where the renderer needs it, and the invisible watermark;
6. composite with the mask's feathered edge into the frame's face region (every pixel outside the
   mask is the input's).
The host then places the region into the frame (`FaceRegion.place`) and encodes it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import typing

import numpy as np

from avatar.face.align import FaceRegion
from avatar.render.warp import InnerMouth

__all__ = ["FaceRegion", "FaceRenderer", "FrameJob", "FramePool", "Identity", "RenderBatch"]


@dataclasses.dataclass
class Identity:
    """A person, prepared once (`avatar/person.py`).

    references: the diffusion renderer's reference crops, `(S, S, 3) uint8` each (a closed mouth
    first, then an open one when the source has one). inner: the open mouth the warp renderer takes
    the inside of the mouth from, if the person has one. rest / rest_anchor: the closed mouth
    `(59, 2)` and its anchor `(2,)` in crop pixels (`avatar.motion.runner.rest_pose`).
    drift_references: `(image, landmarks (478, 3))` pairs in image pixels for the drift monitor.
    rest_inferred: the rest mouth was inferred by the closed-mouth prior (the source showed it open).
    bank: the person's own open mouths (`avatar.render.retrieval.MouthBank`, from enrollment), or None.
    adaptation: the person's motion adaptation (`avatar.motion.adapt.MotionAdaptation`), or None.
    """

    references: typing.List[np.ndarray]
    rest: np.ndarray
    rest_anchor: np.ndarray
    drift_references: typing.List[typing.Tuple[np.ndarray, np.ndarray]]
    inner: InnerMouth = dataclasses.field(default_factory=lambda: InnerMouth(None, None))
    rest_inferred: bool = False
    bank: typing.Any = None
    adaptation: typing.Any = None


@dataclasses.dataclass
class FrameJob:
    """One output frame to make. transform None: no face, the frame is passed through.

    frame: `(H, W, 3) uint8`; transform: `(2, 3)` frame → crop; crop_landmarks: `(478, 3)` the face as it
    is, crop pixels; frame_landmarks: the same in frame pixels; mouth: `(59, 2)` target, crop pixels;
    bank_index: the entry of the person's mouth bank chosen for this frame (`MouthBank.path`; -1, NONE:
    no entry, the warp alone), or None (the retrieval renderer chooses as a stream does); stream: the
    stream of frames the job belongs to (a `FrameStream` of one file's run, a live session: any object
    a weak reference can name), whose last bank entry the retrieval renderer keeps apart from other
    streams' of the same person; None: the person's own.
    """

    frame: np.ndarray
    transform: typing.Optional[np.ndarray] = None
    crop_landmarks: typing.Optional[np.ndarray] = None
    frame_landmarks: typing.Optional[np.ndarray] = None
    mouth: typing.Optional[np.ndarray] = None
    bank_index: typing.Optional[int] = None
    stream: typing.Any = None


class FrameStream:
    """Names one sequence of frames rendered in order (`FrameJob.stream`): a file's run, whose bank
    choices and dissolves start afresh and never follow another run's."""


@dataclasses.dataclass
class RenderBatch:
    """Frames rendered in one call: each job with its person (several live sessions can share a
    call) and its output frame index (which sets the watermark's phase)."""

    jobs: typing.Sequence[FrameJob]
    identities: typing.Sequence[Identity]
    frame_indices: typing.Sequence[int]

    def __post_init__(self):
        if not len(self.jobs) == len(self.identities) == len(self.frame_indices):
            raise ValueError(f"a batch needs one identity and one frame index per job; got {len(self.jobs)} jobs, "
                             f"{len(self.identities)} identities, {len(self.frame_indices)} indices")

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def faces(self) -> typing.List[int]:
        """The positions of the jobs with a face to render."""
        return [i for i, job in enumerate(self.jobs) if job.transform is not None]


class FaceRenderer(typing.Protocol):
    """What the pipeline and the live engine need of a renderer."""

    name: str
    model_files: typing.Tuple[str, ...]  # the files of the model folder it renders with (their hashes go in reports)
    references: int  # reference crops an identity keeps for it

    def render(self, batch: RenderBatch) -> typing.List[typing.Optional[FaceRegion]]:
        """Steps 1-6 for every job of the batch: the finished face region per job, None for a job
        without a face (its frame passes through)."""

    def warm_up(self, batch: int) -> None:
        """Run once on blank input, so that lazy set-up is not paid by a live session's first frame."""


def one_blas_thread() -> None:
    """Make BLAS (numpy's and scipy's OpenBLAS) run on one thread for the calls of the calling thread
    (threadpoolctl; OpenBLAS applies a limit set on a thread other than the main one to that thread's
    own calls): the initializer of the frame path's own threads. Its matrices are small (a thin-plate
    spline's ~130 control points): BLAS's threads gain nothing there and spin between calls; on 2
    cores they took a third of a dub's CPU (23.7 → 16.1 CPU-seconds, 0.59 → 0.75× real time, the
    same frames)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


class FramePool:
    """Per-frame CPU work on a thread pool (numpy, OpenCV and onnxruntime release the GIL for most of
    a frame's work), on threads of its own whose BLAS runs on one thread (`one_blas_thread`).
    `workers` 0: one per core, at most 8; 1: one thread, a frame after another."""

    def __init__(self, workers: int = 0):
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._pool: typing.Optional[concurrent.futures.ThreadPoolExecutor] = None

    def map(self, work: typing.Callable[[int], typing.Any], items: typing.Sequence[int]) -> typing.List[typing.Any]:
        """`[work(i) for i in items]`, in order."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="frame", initializer=one_blas_thread)
        return list(self._pool.map(work, items))
