"""The frame graph (`avatar/render/frame_graph.py`, exported to ONNX) behind the renderer interface:
`GraphRenderer` renders a whole batch, of any people, in one onnxruntime call from the frames' face
regions to their finished regions. The host only prepares small inputs at the crop's side S and
slices regions out of and into frames.

    renderer = GraphRenderer("assets", PipelineConfig(renderer="diffusion"))   # or "warp", "retrieval"
    regions = renderer.render(RenderBatch(jobs, identities, frame_indices))

The graph's inputs, per frame of the batch (B frames; P: the batch's region side; N: spline points;
M: open-mouth image side):

| name | shape, dtype | what |
|---|---|---|
| patch | (B, P, P, 3) uint8 | the frame's region (`FaceAligner.paste_box`), its right and bottom edge repeated up to P |
| patch_from_crop, crop_from_patch | (B, 2, 3) float32 | crop pixel ↔ region pixel |
| level, detail | (B,) float32 | the crop's mip-map level (0: the face at its size or enlarged; k: shrunk, from the region averaged over 2^k px); 1: give the region the frame's detail back |
| mask, upper | (B, S, S) float32 | the repaint mask; 1 above the target's mouth line (`upper_side`) |
| upper_points, lower_points | (B, N, 2) float32 | the two splines' target points (padding rows: weight 0) |
| upper_weights, lower_weights; upper_affine, lower_affine | (B, N, 2); (B, 3, 2) float32 | their solved weights |
| hole, lip_band | (B, S, S) float32 | where rows are composed (`mouth_hole`, 0 for none); the target's lips (`lip_colour`) |
| cavity | (B, 2) float32 | the inside's top row and height (`cavity`) |
| meet | (B,) float32 | how far the target's lips meet (`lips_meet`): the hole takes the lips' colour instead of rows |
| inner, lower_row | (B, M, M, 3) → (B, 3, M, M) float32 | the open mouths the rows come from (edges repeated) |
| inner_columns, lower_columns | (B, 4, S) float32 | `row_columns` per crop column |
| inner_box, lower_box | (B, S, S) float32 | 1 where the rows are composed (`row_box`; 0: no usable mouth) |
| inner_lips, lower_lips | (B, 3) float32 | those mouths' lip colours; inner_borrowed, lower_borrowed (B,): from the bank |
| watermark | (B,) float32 | the watermark's strength at the frame's index; pattern (S, S): the watermark |
| entry | (B, 3, S, S) float32 | retrieval and diffusion: the frame's bank entry (`MouthBank.scaled`; 0 without one) |
| entry_upper_points ... entry_lower_affine | as the splines above | the entry's splines, from its mouth to the target's |
| entry_hole, entry_inner_box, entry_lower_box | (B, S, S) float32 | the rows composed into the entry (its own opening's hole) |
| entry_region | (B, S, S) float32 | where the entry is blended (`lips_region`; 0 without an entry) |
| references, sketch, noise | (B, 3K, S, S), (B, 3, S, S), (B, 3, S, S) float32 | diffusion only (`build_condition`) |

Outputs: `pixels (B, P, P, 3) uint8` (the finished region) and `alpha (B, P, P) float32`.
"""

from __future__ import annotations

import os
import typing

import numpy as np

from avatar import provenance
from avatar.config import AlignConfig, PipelineConfig
from avatar.errors import AvatarError
from avatar.face import landmarks as lm
from avatar.face.align import FaceRegion, invert_transform, nonzero_box, transform_scale
from avatar.render.base import FrameJob, FramePool, Identity, RenderBatch
from avatar.render.condition import landmark_sketch
from avatar.render.renderers import RetrievalRenderer, dissolve, frame_references
from avatar.render.retrieval import lips_region
from avatar.render.warp import (INNER, InnerMouth, lip_band, lips_meet, mouth_hole, row_box, row_columns, spline_points, spline_system,
                                upper_side, warp_points)

# per graph kind: the renderers' ("warp", "retrieval", "diffusion") and "diffusion_plain", the diffusion
# graph without the bank entry's path, which a diffusion batch with no entry to draw runs instead (a
# person without a bank: the same pixels within a level; on a 2-core CPU the call takes 8-11% less)
GRAPH_FILES = {"warp": "frame_warp.onnx", "retrieval": "frame_retrieval.onnx", "diffusion": "frame_diffusion.onnx",
               "diffusion_plain": "frame_diffusion_plain.onnx"}
SPLINES = ("upper_points", "upper_weights", "upper_affine", "lower_points", "lower_weights", "lower_affine")
ENTRY_INPUTS = ("entry", *("entry_" + name for name in SPLINES), "entry_hole", "entry_inner_box", "entry_lower_box", "entry_region")
DIFFUSION_INPUTS = ("references", "sketch", "noise")
GRAPH_INPUTS = ("patch", "patch_from_crop", "crop_from_patch", "level", "detail", "mask", "upper", *SPLINES,
                "hole", "lip_band", "cavity", "meet", "inner", "inner_columns", "inner_box", "inner_lips", "inner_borrowed",
                "lower_row", "lower_columns", "lower_box", "lower_lips", "lower_borrowed", "watermark", "pattern",
                *ENTRY_INPUTS, *DIFFUSION_INPUTS)


def graph_inputs(kind: str) -> typing.Tuple[str, ...]:
    """The inputs of the `kind` graph ("warp": no bank entry; "retrieval": no denoiser; "diffusion":
    all; "diffusion_plain": no bank entry)."""
    entry, denoiser = has_entry(kind), kind.startswith("diffusion")
    return tuple(n for n in GRAPH_INPUTS if (entry or n not in ENTRY_INPUTS) and (denoiser or n not in DIFFUSION_INPUTS))


def has_entry(kind: str) -> bool:
    """Whether the `kind` graph draws the person's bank entry (`FrameGraph(retrieval=True)`)."""
    return kind in ("retrieval", "diffusion")


def solve_splines(splines: typing.Sequence[typing.Tuple[np.ndarray, np.ndarray]], size: int = 0) -> typing.Tuple[np.ndarray, ...]:
    """Many splines' weights in one batched solve: `splines` of `(points (n, 2), values (n, 2))` →
    points `(M, N, 2)`, kernel weights `(M, N, 2)` and affine parts `(M, 3, 2)` for (1, x, y), with N
    the most points (at least `size`); a shorter spline repeats its last point with weight 0 (its
    system grown by identity rows, so the weights solve to 0); each system is `spline_system`'s, the
    per-frame path's."""
    count = max([size] + [len(points) for points, _ in splines])
    systems = np.zeros((len(splines), count + 3, count + 3))
    rhs = np.zeros((len(splines), count + 3, 2))
    padded = np.zeros((len(splines), count, 2))
    for k, (points, values) in enumerate(splines):
        n = len(points)
        system = spline_system(points)
        systems[k, :n, :n], systems[k, range(n, count), range(n, count)] = system[:n, :n], 1.0
        systems[k, :n, count:], systems[k, count:, :n] = system[:n, n:], system[n:, :n]
        rhs[k, :n] = values
        padded[k, :n], padded[k, n:] = points, points[-1]
    solved = np.linalg.solve(systems, rhs)
    return padded, solved[:, :count], solved[:, count:]


def graph_model(path: typing.Union[str, os.PathLike],
                sources: typing.Optional[typing.Dict[str, dict]] = None) -> typing.Optional[bytes]:
    """The frame graph at `path` made whole, or None when it is whole already: the diffusion graph
    is shipped without the denoiser's weights that `render.onnx` beside it holds (the same values;
    metadata `shared_from`, `shared_prefix`, `shared_weights`), so they are not shipped twice.
    `sources` (file → its weights by name) keeps a weight file read once for several graphs. Needs
    the `onnx` package (the `gpu` extra)."""
    import json

    try:
        import onnx
    except ImportError as exc:
        raise AvatarError(f"{path}: the diffusion frame graph takes its denoiser's weights from render.onnx, which needs "
                          f"the onnx package ({exc}); install the `gpu` extra") from exc
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    if "shared_from" not in meta:
        return None
    source = os.path.join(os.path.dirname(str(path)), meta["shared_from"])
    if not os.path.exists(source):
        raise AvatarError(f"{path}: takes its weights from {source}, which is missing")
    sources = {} if sources is None else sources
    if source not in sources:
        sources[source] = {w.name: w for w in onnx.load(source).graph.initializer}
    weights = sources[source]
    prefix = meta["shared_prefix"]
    for name in json.loads(meta["shared_weights"]):
        weight = weights.get(name[len(prefix):])
        if weight is None:
            raise AvatarError(f"{path}: {source} has no weight {name[len(prefix):]!r}; export the frame graph again "
                              f"(python -m training.export_graph)")
        shared = onnx.TensorProto()
        shared.CopyFrom(weight)
        shared.name = name
        proto.graph.initializer.append(shared)
    return proto.SerializeToString()


class GraphRenderer(RetrievalRenderer):
    """`config.renderer` ("warp", "retrieval" or "diffusion") as one ONNX graph per batch, on the
    canonical crop of side `crop_size` (the per-frame warp works at the face's own resolution; the
    graph at the crop's, with the frame's detail given back). The retrieval renderer's bank choice is
    the per-frame one's; the retrieval and diffusion graphs draw the chosen entry as it does."""

    def __init__(self, folder: typing.Union[str, os.PathLike], config: PipelineConfig = PipelineConfig(),
                 crop_size: int = AlignConfig.crop_size, providers: typing.Optional[typing.Sequence[str]] = None,
                 pool: typing.Optional[FramePool] = None):
        from avatar.runtime import OnnxSession

        super().__init__(config, crop_size, pool)
        self.name = self.kind = config.renderer
        path = os.path.join(folder, GRAPH_FILES[self.kind])
        if not os.path.exists(path):
            raise AvatarError(f"{path}: no such model file (python -m training.export_graph makes it)")
        # fp32: the graph computes pixel coordinates up to thousands, beyond float16's steps
        weight_files: typing.Dict[str, dict] = {}  # render.onnx read once for both diffusion graphs
        self.session = OnnxSession(path, providers=providers, threads=config.threads,
                                   model=graph_model(path, weight_files) if self.kind == "diffusion" else None)
        self.model_files = (GRAPH_FILES[self.kind],)
        self.plain = None  # the diffusion graph for batches with no bank entry to draw
        if self.kind == "diffusion":
            plain = os.path.join(folder, GRAPH_FILES["diffusion_plain"])
            if not os.path.exists(plain):
                raise AvatarError(f"{plain}: no such model file (python -m training.export_graph makes it)")
            self.plain = OnnxSession(plain, providers=providers, threads=config.threads, model=graph_model(plain, weight_files))
            self.model_files += (GRAPH_FILES["diffusion_plain"],)
        meta = self.session.metadata
        if int(meta.get("crop_size", crop_size)) != crop_size:
            raise AvatarError(f"{path}: renders {meta.get('crop_size')}² crops; this pipeline aligns to {crop_size}²")
        if self.kind == "diffusion":
            from avatar.render.sampling import steps_from

            self.references, self.retrieved = int(meta["references"]), int(meta.get("retrieved", 0))
            steps = config.steps or steps_from(config.diffusion_start, int(meta["model_steps"]))
            made, asked = (float(meta["start"]), int(meta["steps"]), float(meta["colour_match"])), (config.diffusion_start, steps, config.colour_match)
            if not np.allclose(made, asked):
                raise AvatarError(f"{path}: made for diffusion start, steps and colour match {made}; this pipeline asks for {asked} "
                                  f"(python -m training.export_graph makes another)")
            self.noise = np.random.default_rng(config.seed).standard_normal((3, crop_size, crop_size)).astype(np.float32)
        self.aligner = self.aligners(crop_size)
        self.pattern = provenance.watermark_pattern(crop_size)

    def prepare(self, job: FrameJob, identity: Identity, frame_index: int, entry: typing.Optional[int],
                box: typing.Tuple[int, int, int, int], kind: typing.Optional[str] = None) -> typing.Dict[str, typing.Any]:
        """The `kind` graph's inputs (default: this renderer's) for one frame (without the batch axis;
        patch and mouths not yet padded); `entry`: the person's bank entry for it (`choose`; None for a
        graph without the entry's path); `box`: its region in the frame (`FaceAligner.paste_box`, not
        empty)."""
        entry_path = has_entry(kind or self.kind)
        inner = self.inner_for(identity, entry).at(self.crop_size)
        size = self.crop_size
        landmarks = np.asarray(job.crop_landmarks, np.float64)[:, :2]
        mouth = np.asarray(job.mouth, np.float64)
        mask = self.aligner.repaint_mask(landmarks, lm.with_mouth(landmarks, mouth))
        x0, y0, x1, y1 = box
        shift = np.array([[1, 0, -x0], [0, 1, -y0]], np.float64)
        patch_from_crop = shift @ np.vstack([invert_transform(job.transform), [0, 0, 1]])
        scale = transform_scale(job.transform)  # crop px per frame px
        level = 0 if scale >= 0.75 else min(3, int(np.ceil(np.log2(0.75 / scale))))  # as warp_image: area averaging below 0.75
        out: typing.Dict[str, typing.Any] = {
            "box": (x0, y0, x1, y1), "patch": job.frame[y0:y1, x0:x1],
            "patch_from_crop": patch_from_crop, "crop_from_patch": invert_transform(patch_from_crop),
            "level": float(level), "detail": float(self.config.detail and 0.7 / scale >= 0.75),
            "mask": mask, "upper": upper_side(mouth, size), "lip_band": _or_everywhere(lip_band(mouth, (size, size))),
            "watermark": provenance.AMPLITUDE * np.sin(2 * np.pi * frame_index / provenance.PERIOD_FRAMES) if self.config.watermark else 0.0,
        }
        for name, (target, source) in zip(("upper", "lower"), warp_points(landmarks, mouth, mask)):
            out[f"{name}_spline"] = spline_points(target, source)  # solved for the whole batch at once (`stack`)
        top, bottom = mouth[INNER, 1].min(), mouth[INNER, 1].max()
        out["cavity"] = (top, max(bottom - top, 1.0))
        out["meet"] = lips_meet(mouth)
        # the rows composed into the frame's warp (and into the entry's, from its own opening)
        layers = {"lower_row": inner.lower_row if inner.usable and inner.lower_row is not None and inner.lower_row.usable else None,
                  "inner": inner if inner.usable else None}
        sources = {"": landmarks}
        if entry_path:
            region = np.zeros((size, size), np.float32)
            if entry is not None:
                crop, entry_mouth = identity.bank.scaled(entry, size)
                sources["entry_"] = lm.with_mouth(landmarks, entry_mouth)
                region = lips_region(mouth, size)
                for name, (target, source) in zip(("upper", "lower"), warp_points(sources["entry_"], mouth, region)):
                    out[f"entry_{name}_spline"] = spline_points(target, source)
            else:  # nothing drawn: the identity (three points that do not move; its weights solve to 0)
                crop = np.zeros((size, size, 3), np.uint8)
                out["entry_upper_spline"] = out["entry_lower_spline"] = (np.array([[0.0, 0.0], [size, 0.0], [0.0, size]]), np.zeros((3, 2)))
            out["entry"], out["entry_region"] = crop.transpose(2, 0, 1).astype(np.float32), region
        spans = []
        for prefix, source in sources.items():
            hole = mouth_hole(source[lm.MOUTH_AND_JAW], mouth, inner, size)
            out[prefix + "hole"] = np.zeros((size, size), np.float32) if hole is None else hole
            hx0 = hy0 = hx1 = hy1 = 0
            if hole is not None:
                hx0, hy0, hx1, hy1 = nonzero_box(hole)
            for name, layer in layers.items():
                key = prefix + ("lower" if name == "lower_row" else "inner")
                box = np.zeros((size, size), np.float32)
                bx0, by0, bx1, by1 = row_box(mouth, (hx0, hy0), (hy1 - hy0, hx1 - hx0))
                if layer is not None and hole is not None and bx1 > bx0 and by1 > by0:
                    box[by0:by1, bx0:bx1] = 1.0
                    spans.append((bx0, bx1))
                out[f"{key}_box"] = box
        if entry_path and "entry_" not in sources:  # no entry: nothing composed into it
            out["entry_hole"] = out["entry_inner_box"] = out["entry_lower_box"] = np.zeros((size, size), np.float32)
        for name, layer in layers.items():  # a row's columns hold wherever either box needs them
            key = "lower" if name == "lower_row" else "inner"
            columns = np.zeros((4, size), np.float32)
            if layer is not None and spans:
                xs = np.arange(min(a for a, _ in spans), max(b for _, b in spans), dtype=np.float64)
                columns[:, int(xs[0]):int(xs[-1]) + 1] = np.stack(row_columns(layer, mouth, xs))
            out[name] = layer.crop if layer is not None else np.zeros((1, 1, 3), np.uint8)
            out[f"{key}_columns"] = columns
            out[f"{key}_lips"] = layer.lips_rgb if layer is not None else np.zeros(3)
            out[f"{key}_borrowed"] = float(layer is not None and layer.borrowed)
        if self.kind == "diffusion":
            references = frame_references(identity, entry, self.references, self.retrieved, size)
            out["references"] = np.concatenate([r.transpose(2, 0, 1) for r in references]).astype(np.float32)
            out["sketch"], out["noise"] = landmark_sketch(mouth, size), self.noise
        return out

    def render(self, batch: RenderBatch) -> typing.List[typing.Optional[FaceRegion]]:
        regions: typing.List[typing.Optional[FaceRegion]] = [None] * len(batch)
        boxes = {i: self.aligner.paste_box(batch.jobs[i].frame.shape, batch.jobs[i].transform) for i in batch.faces}
        faces = [i for i, (x0, y0, x1, y1) in boxes.items() if x1 > x0 and y1 > y0]
        for i in set(boxes) - set(faces):  # the crop lies outside the frame: nothing of it to place
            regions[i] = FaceRegion(0, 0, np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.float32))
        if not faces:
            return regions
        # the warp renderer draws no entry; a frame where the entry changes while the mouth is open is
        # rendered with both and shown half and half (`RetrievalRenderer.choose_and_fades`)
        entries, fades = self.choose_and_fades(batch) if has_entry(self.kind) else ([None] * len(batch), [None] * len(batch))
        kind, session = self.kind, self.session
        if self.plain is not None and all(entries[i] is None for i in faces):  # nothing to draw: the graph without that path
            kind, session = "diffusion_plain", self.plain
        rows = [(i, entries[i]) for i in faces] + [(i, fades[i]) for i in faces if fades[i] is not None]
        prepared = self.pool.map(lambda row: self.prepare(batch.jobs[row[0]], batch.identities[row[0]], int(batch.frame_indices[row[0]]),
                                                          row[1], boxes[row[0]], kind), rows)
        outputs = session.run(**self.stack(prepared, kind))
        for k, (i, _) in enumerate(rows):
            x0, y0, x1, y1 = prepared[k]["box"]
            h, w = y1 - y0, x1 - x0
            region = FaceRegion(y0, x0, outputs["pixels"][k, :h, :w], outputs["alpha"][k, :h, :w])
            regions[i] = region if regions[i] is None else dissolve(regions[i], region)
        return regions

    def stack(self, prepared: typing.Sequence[typing.Dict[str, typing.Any]], kind: typing.Optional[str] = None) -> typing.Dict[str, np.ndarray]:
        """The `kind` graph's batch inputs (default: this renderer's): regions padded to the largest
        (edges repeated), the splines solved in one call (`solve_splines`), open mouths padded to the
        largest."""
        side = 16 * -(-max(max(p["patch"].shape[:2]) for p in prepared) // 16)
        out: typing.Dict[str, np.ndarray] = {"patch": np.stack([_edge_pad(p["patch"], side) for p in prepared])}
        for name in ("inner", "lower_row"):
            m = max(max(p[name].shape[:2]) for p in prepared)
            out[name] = np.stack([_edge_pad(p[name], m) for p in prepared]).transpose(0, 3, 1, 2).astype(np.float32)
        names = ("upper", "lower") + (("entry_upper", "entry_lower") if has_entry(kind or self.kind) else ())
        count = max(len(p[f"{name}_spline"][0]) for p in prepared for name in names)  # one size for all (the graph's)
        for name in names:
            for part, value in zip(("points", "weights", "affine"), solve_splines([p[f"{name}_spline"] for p in prepared], count)):
                out[f"{name}_{part}"] = value
        skip = {"box", "patch", "inner", "lower_row", *(f"{name}_spline" for name in names)}
        for key in prepared[0]:
            if key not in skip:
                out[key] = np.stack([np.asarray(p[key]) for p in prepared])
        out = {k: v if v.dtype == np.uint8 else v.astype(np.float32) for k, v in out.items()}
        out["pattern"] = self.pattern
        return out

    def warm_up(self, batch: int) -> None:
        """onnxruntime's lazy set-up, on a blank frame."""
        from avatar.face.align import crop_template

        face = crop_template(self.crop_size)
        transform = np.array([[1.0, 0, 0], [0, 1.0, 0]])
        job = FrameJob(np.full((self.crop_size, self.crop_size, 3), 128, np.uint8), transform, np.c_[face, np.zeros(len(face))],
                       face, face[lm.MOUTH_AND_JAW])
        references = [np.full((self.crop_size, self.crop_size, 3), 128, np.uint8)] * max(1, getattr(self, "references", 0))
        person = Identity(references, face[lm.MOUTH_AND_JAW], np.zeros(2), [])
        self.render(RenderBatch([job] * batch, [person] * batch, list(range(batch))))


def _or_everywhere(band: np.ndarray) -> np.ndarray:
    """`band (S, S) bool` as float32, or all ones when it is empty (as `lip_colour` falls back to the whole crop)."""
    return band.astype(np.float32) if band.any() else np.ones(band.shape, np.float32)


def _edge_pad(image: np.ndarray, side: int) -> np.ndarray:
    """`image (h, w, 3)` grown to `(side, side, 3)` by repeating its right column and bottom row."""
    h, w = image.shape[:2]
    return np.pad(image, ((0, side - h), (0, side - w), (0, 0)), mode="edge")
