"""One dataclass config per component; every default lives here. The CLI is built from these.

`add_config_arguments` turns a config class into argparse options (`--face.min-face-size 64`),
and `config_from_args` builds the instance back, so a default is never written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass

from avatar.errors import AvatarError


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def require(condition: bool, message: str) -> None:
    """Raise a one-line AvatarError (the CLI prints it and exits 2) unless `condition`."""
    if not condition:
        raise AvatarError(message)


# The ranges of the options a user sets (`check_ranges`): (lowest, highest, what the number means).
RANGES: typing.Dict[str, typing.Tuple[float, float, str]] = {
    "fps": (1, 120, "frames per second"),
    "max_side": (64, 16384, "pixels"),
    "warp_max_size": (128, 1024, "pixels"),
    "steps": (0, 1000, "diffusion steps; 0: the model's own"),
    "batch": (1, 1024, "frames per renderer call"),
    "colour_match": (0, 1, ""),
    "drift_references": (1, 64, "frames"),
    "crf": (0, 51, "H.264 quality, lower is better"),
    "max_minutes": (0.05, 10080, "minutes of output"),
    "threads": (0, 256, ""),
    "speech_threads": (0, 256, ""),
    "workers": (0, 256, ""),
    "jpeg_quality": (1, 100, ""),
    "max_backlog_s": (0, 60, "seconds"),
    "drift_every_s": (0, 3600, "seconds"),
    "max_sessions": (1, 1024, ""),
    "max_load": (0.05, 64, "the renderer's share the sessions may take, measured"),
    "max_latency_s": (0.1, 60, "seconds"),
    "encode_workers": (0, 256, ""),
    "client_queue_frames": (1, 10000, ""),
    "idle_timeout_s": (0.1, 86400, "seconds"),
    "silence_after_s": (0.02, 60, "seconds"),
}


def check_ranges(config: typing.Any, names: typing.Sequence[str]) -> None:
    """Each named field of `config` must be a finite number within RANGES; the one-line error names
    the option (`--name-with-dashes`)."""
    for name in names:
        low, high, unit = RANGES[name]
        value = getattr(config, name)
        require(isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high,
                f"--{name.replace('_', '-')} must be between {low:g} and {high:g}{f' ({unit})' if unit else ''}, not {value}")


@dataclass(frozen=True)
class MelConfig:
    """Wav2Lip-compatible log-mel front-end (80 mel frames per second at 16 kHz)."""

    sample_rate: int = 16000
    n_fft: int = 800
    hop_length: int = 200
    win_length: int = 800
    n_mels: int = 80
    fmin: float = 55.0
    fmax: float = 7600.0
    preemphasis: float = 0.97
    ref_level_db: float = 20.0
    min_level_db: float = -100.0
    max_abs_value: float = 4.0
    # Per-video-frame windows: frame i uses mel[start : start + window_frames] with
    # start = int(i * 80 / fps) + window_offset. Negative offsets centre the window (less look-ahead).
    window_frames: int = 16
    window_offset: int = 0


@dataclass(frozen=True)
class SpeechConfig:
    """Whisper's log-mel front-end and the speech encoder's windows (`avatar/speech/`).

    Log-mel: 16 kHz, 80 Slaney mel bins of the power STFT (n_fft 400, hop 160: 100 frames/s, frame j
    centred on sample 160 j, zero padding at both ends), log10, floored, then (x + 4) / 4 as Whisper
    does. Whisper floors at its 30-s window's maximum − 8, which depends on audio not yet heard; here
    the floor is fixed (`log_floor`, the maximum of full-scale speech − 8), so streaming gives the
    batch numbers.

    Encoder frames are 20 ms (frame k centred on 20 k ms). Offline, the encoder sees whole chunks of
    `offline_chunk` frames (30 s, Whisper's own window), overlapping by `offline_context` on each
    side. Live, it sees the last `live_window` frames (silence before the start) in windows that end
    at encoder frames `live_phase`, `live_phase + live_hop`, ..., and takes each frame from the first
    window that holds at least `live_right` frames after it: a frame's look-ahead is at most
    20 × (live_hop + live_right − 1) ms + 2.5 ms (the last mel frame's half window past its centre),
    102.5 ms at the defaults. At 25 fps every video frame falls on an even encoder frame, which the
    default windows (ending on odd frames) give with 100 ms of audio after it, the most that keeps
    the look-ahead at any frame rate near 120 ms (the odd frames get 80 ms). A video frame between two
    encoder frames reads both (linearly), except where the later one would make it wait longer than
    `live_max_lookahead_ms`: it then reads the earlier alone (at 24 fps one frame in 24, at 29.97 one
    in 16, each within 2.5 ms of that encoder frame; none at 25 or 30), so the live
    look-ahead is at most 120 ms at any rate. Offline-live features (`live=True` on a whole file) are
    computed from exactly the windows a stream sees.

    A live frame's features are its own row and the `live_ahead` rows after it in the same window,
    side by side (`(1 + live_ahead)·D` wide; `SpeechEncoder.live_width`): the window is the one the
    frame waits for anyway, so this adds no look-ahead; the frame's own row hears those frames through
    attention, but the rows themselves carry more of them (a ridge read-out on the training people's
    folds: opening r 0.377 → 0.419). Where a window holds fewer rows after a frame (the second of its
    `live_hop` frames: 3), the last one is repeated. Offline features are one row per frame.

    `live_int8`: on the CPU provider, live windows go through an int8 copy of the live graph
    (`avatar.speech.live_graph.int8_graph`: weight MatMuls in int8, activations quantized per window
    as it runs), about 2× faster a window; its features are the float graph's to a mean |Δ| of about
    0.07 (values of mean |x| 1.0, correlation 0.9987), and each window is encoded alone (its numbers
    must not depend on other windows in the same call). The live motion model's linear read-out
    (1.13 M weights, read once a frame in a stream) then runs in 8 bits too (`MotionPredictor`,
    `avatar.runtime.weight_only_int8`: landmarks within 0.003 px of the float file's on speech, each frame
    computed on its own; ~0.5 s more when the live model loads). Other providers run the float graphs.
    """

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 80
    log_floor: float = -6.5
    live_window: int = 50
    live_hop: int = 2
    live_right: int = 4
    live_phase: int = 1
    live_ahead: int = 4
    live_max_lookahead_ms: float = 120.0
    live_int8: bool = True
    offline_chunk: int = 1500
    offline_context: int = 125


@dataclass(frozen=True)
class VadConfig:
    """Energy-based voice activity per video frame, with a tracked noise floor."""

    margin_db: float = 12.0  # speech is this far above the tracked noise floor
    absolute_floor_dbfs: float = -55.0  # anything quieter is silence, whatever the floor
    floor_rise_db_per_s: float = 3.0  # how fast the noise-floor tracker may rise
    softness_db: float = 2.0  # width of the soft decision around the threshold
    hangover_s: float = 0.12  # speech stays "on" this long after the energy drops


@dataclass(frozen=True)
class SilenceConfig:
    """The mouth in long silences (`avatar.motion.runner.SilenceHold`): after `hold_after_s` of
    continuous silence by the voice-activity measure (score < 0.5, after its hangover), the predicted
    mouth eases to the rest shape over `ease_s` and stays there until the voice returns. Shorter
    pauses keep the model's motion: real mouths often stay open in them (breaths), and holding from
    0.5 s on lowered the held-out opening correlation by 0.02 (offline) and 0.05 (live), from 0.8 s by
    0.002 and 0.01 (assets/MODELS.md). Causal: streaming gives the batch frames."""

    enabled: bool = True
    hold_after_s: float = 0.8
    ease_s: float = 0.16


@dataclass(frozen=True)
class FaceConfig:
    """Face detection, choice and landmark tracking (mediapipe face mesh, 478 points)."""

    max_faces: int = 6
    face_index: typing.Optional[int] = None  # faces are numbered left to right; None: the largest
    min_face_size: int = 48  # px: the face box height in the source image must be at least this
    ambiguity_ratio: float = 0.8  # a second face this close in size to the largest needs face_index
    min_detection_confidence: float = 0.5
    mesh_input_size: int = 256  # px: face region is resized to this before the mesh model
    mesh_workers: int = 2  # video: 2 meshes the next frame ahead in the same region (the same landmarks, ~1.5x faster)
    # Temporal smoothing in video (one-euro filters; units: inter-ocular distances and seconds).
    smooth: bool = True
    landmark_min_cutoff_hz: float = 8.0  # lips must keep their motion: r > 0.98 with raw on real clips
    landmark_beta: float = 20.0
    transform_min_cutoff_hz: float = 1.0
    transform_beta: float = 1.5


@dataclass(frozen=True)
class AlignConfig:
    """Canonical alignment to a square crop and paste-back."""

    crop_size: int = 128
    feather_frac: float = 0.06  # feather band width as a fraction of the crop size
    lower_face_dilate_frac: float = 0.04  # grow the lower-face mask by this fraction of the crop


@dataclass(frozen=True)
class PreprocessConfig:
    """Dataset preprocessing into the training cache."""

    crop_sizes: typing.Tuple[int, ...] = (128,)
    kinds: typing.Tuple[str, ...] = ("video", "video_silent")
    workers: int = 2
    max_yaw_deg: float = 40.0  # frames turned further are dropped as "profile"
    min_sharpness_ratio: float = 0.35  # Laplacian variance below this fraction of the clip median: "blur"
    crop_crf: int = 16  # H.264 quality of cached crops (lower is better)
    val_seed: int = 20261122


def _field_type(field: dataclasses.Field, cls: type) -> type:
    hints = typing.get_type_hints(cls)
    return hints[field.name]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str, defaults: typing.Any = None,
                         exclude: typing.Sequence[str] = ()) -> None:
    """Add one `--{prefix}.{field-name}` option per dataclass field (`--{field-name}` when the prefix
    is empty), defaulting to the config's (`defaults`: an instance whose values are the defaults).
    A field that is itself a config is flattened under the same prefix, with the options its class
    lists in `cli_hidden` left out (`RealtimeConfig.pipeline`: the pipeline's options, live)."""
    group = parser.add_argument_group(f"{prefix or cls.__name__} options")
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        hint = _field_type(field, cls)
        default = getattr(defaults, field.name) if defaults is not None else field.default
        if dataclasses.is_dataclass(hint):
            add_config_arguments(parser, hint, prefix, default, getattr(cls, "cli_hidden", {}).get(field.name, ()))
            continue
        flag = f"--{prefix + '.' if prefix else ''}{field.name.replace('_', '-')}"
        dest = f"{prefix}__{field.name}"
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if hint is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default)
        elif origin is typing.Union and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            group.add_argument(flag, dest=dest, type=inner, default=default, metavar=inner.__name__.upper())
        elif origin in (tuple, typing.Tuple):
            group.add_argument(flag, dest=dest, type=args[0], nargs="+", default=default)
        else:
            group.add_argument(flag, dest=dest, type=hint, default=default, metavar=hint.__name__.upper())


def config_from_args(args: argparse.Namespace, cls: type, prefix: str, defaults: typing.Any = None,
                     exclude: typing.Sequence[str] = ()):
    """Build a `cls` instance from options added by `add_config_arguments` (the same nesting rules)."""
    values = {}
    for field in dataclasses.fields(cls):
        default = getattr(defaults, field.name) if defaults is not None else field.default
        hint = _field_type(field, cls)
        if field.name in exclude:
            values[field.name] = default
        elif dataclasses.is_dataclass(hint):
            values[field.name] = config_from_args(args, hint, prefix, default, getattr(cls, "cli_hidden", {}).get(field.name, ()))
        else:
            value = getattr(args, f"{prefix}__{field.name}")
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


@dataclass(frozen=True)
class MotionConfig:
    """Speech-encoder features → mouth and jaw landmarks (`avatar/motion/`).

    Two models from one code: the live one (`causal`) reads live features (`SpeechConfig`) and its
    frame layers see only the present and the past, so it adds no look-ahead to the encoder's and
    streams with the offline numbers; the offline one reads whole-utterance features and its layers
    are centred: `temporal_reach` frames ahead and behind (15 at the defaults: 600 ms at 25 fps).
    """

    features: int = 384  # width of the speech encoder's features
    hidden: int = 64
    temporal_kernel: int = 3
    temporal_layers: int = 4  # dilations 1, 2, 4, 8
    causal: bool = True
    n_components: int = 12  # PCA components of the mouth/jaw offsets
    dropout: float = 0.1
    input_dropout: float = 0.2

    @property
    def receptive_frames(self) -> int:
        """Video frames (this one included) that a frame's output depends on."""
        return 1 + (self.temporal_kernel - 1) * (2 ** self.temporal_layers - 1)

    @property
    def temporal_reach(self) -> int:
        """Frames ahead of (offline: and behind) a frame that its output depends on (0 ahead when causal)."""
        return (self.receptive_frames - 1) // 2


@dataclass(frozen=True)
class IdentityConfig:
    """Identity-drift monitoring of output frames (`avatar/identity.py`)."""

    sample_every_s: float = 0.5  # embed an output frame this often
    identity_threshold: float = 0.55  # dlib embedding distance to the nearest reference (same person < 0.6)
    geometry_threshold: float = 0.2  # largest relative change of a 3D face-shape ratio (gross failures only)
    colour_threshold: float = 10.0  # ΔE (CIE76) of repainted-minus-upper-face colour vs the references
    consecutive: int = 2  # samples over a threshold in a row before an alarm
    clear_fraction: float = 0.9  # an alarm ends when the value falls below threshold × this


@dataclass(frozen=True)
class BatchConfig:
    """`avatar batch` on Ray (`avatar/batch.py`)."""

    workers: int = 0  # Ray actors, each with the models loaded (0: one per CPU Ray has)
    address: str = ""  # "" starts a local Ray; "auto" or "ray://HOST:PORT" joins a cluster
    cpus: int = 0  # CPUs of the local Ray (0: this machine's)
    gpus_per_worker: float = 0.0  # a fraction shares a GPU between workers
    retries: int = 2  # more tries of a job whose worker died
    # jobs a worker holds at once: the next one's decoding and face tracking run while one renders (1: one at a time;
    # 0: 2 where a worker has more than one CPU, else 1: measured on 2 cores, 2 workers × 2 jobs were 5% slower than × 1)
    jobs_per_worker: int = 0
    models: str = ""  # folder with the model files (default: the bundled ones)
    verbose: bool = False  # Ray's own log in the terminal

    def __post_init__(self):
        require(0 <= self.workers <= 4096 and 0 <= self.cpus <= 100000, "--workers and --cpus must be 0 or more")
        require(0 <= self.gpus_per_worker <= 64, f"--gpus-per-worker must be between 0 and 64, not {self.gpus_per_worker}")
        require(0 <= self.retries <= 100, f"--retries must be between 0 and 100, not {self.retries}")
        require(0 <= self.jobs_per_worker <= 16, f"--jobs-per-worker must be between 0 and 16, not {self.jobs_per_worker}")


@dataclass(frozen=True)
class C2paConfig:
    """C2PA Content Credentials on every video written (`avatar/credentials.py`)."""

    enabled: bool = True
    cert: str = ""  # PEM certificate chain of the signer, leaf first (else $AVATAR_C2PA_CERT; neither: this install's own, untrusted)
    key: str = ""  # its PEM private key (else $AVATAR_C2PA_KEY)


@dataclass(frozen=True)
class ArtifactConfig:
    """The per-frame artifact check of the repainted region (`avatar/artifacts.py`): a frame that fails
    shows its input instead (dub: the original frame; animate and live: the portrait's own mouth) and
    is reported with its time."""

    enabled: bool = True
    colour_threshold: float = 12.0  # ΔE (CIE76) of the repainted skin's mean colour, output against input
    new_colour_delta: float = 15.0  # ΔE from the closest input colour within `colour_reach` that counts as a new colour
    colour_reach: float = 0.12  # how far around (× the repainted skin's size) the input's colours are looked for
    max_new_colour_share: float = 0.02  # share of the repainted skin in new colours above which it is a pasted patch
    min_detail_ratio: float = 0.5  # the repainted skin's fine detail (mean |Laplacian|), output / input: lower is a smear
    min_cell_detail_ratio: float = 0.2  # the same in the flattest of a 4 × 4 grid of cells: lower is a flat patch
    max_outside_share: float = 0.05  # share of the repaint weight outside the face (as it is ∪ as it will be, grown)
    face_margin: float = 0.1  # the face's outline is grown by this × the face's height before that test
    max_yaw_deg: float = 45.0  # a face turned further is not rendered (dub: the frame passes through; animate: refused)


@dataclass(frozen=True)
class RenderConfig:
    """The lower-face renderer: a conditional denoiser over the aligned crop (`avatar/render/`)."""

    crop_size: int = 128
    references: int = 2  # reference crops of the same person (a closed and an open mouth, alternating)
    retrieved: int = 0  # more references, chosen per frame: the person's own mouths nearest the target's lips
    base_channels: int = 32
    channel_mults: typing.Tuple[int, ...] = (1, 2, 4, 4)
    blocks_per_level: int = 1
    attention_levels: typing.Tuple[int, ...] = (3,)  # self-attention at these levels (3: 16² at 128)
    steps: int = 4  # sampling steps (deterministic DDIM on a cosine schedule)

    @property
    def condition_channels(self) -> int:
        return 3 + 1 + 3 * (self.references + self.retrieved) + 3  # masked target, mask, references, landmark sketch


@dataclass(frozen=True)
class IdleConfig:
    """Life for a still portrait (`avatar animate`): blinks and a little head motion, seeded.

    Blinks close the eyes by warping the lids together (no eye model), at random intervals. The head
    motion is a smooth similarity warp of the whole picture about the face: slow sums of sines in
    rotation, shift and scale, so the background moves with it like a hand-held camera would.
    """

    enabled: bool = True
    seed: int = 0
    blinks_per_minute: float = 14.0
    blink_seconds: float = 0.26  # close and open again
    min_blink_gap_s: float = 1.8
    head_rotation_deg: float = 1.2  # largest roll
    head_shift: float = 0.015  # largest shift, in face heights
    head_scale: float = 0.01  # largest zoom change
    head_period_s: float = 7.0  # the slowest sway


@dataclass(frozen=True)
class PipelineConfig:
    """Speech + a face → lip-synced frames (`avatar.pipeline.AvatarPipeline`)."""

    fps: float = 25.0  # output frame rate for a still (a video keeps its own)
    max_side: int = 1920  # a still larger than this on its longer side is downscaled (area) to it
    # "retrieval": the warp, then the lips and mouth of the person's enrolled mouth nearest each target (avatar/render/retrieval.py;
    # the same as "warp" without them); "warp": the person's own pixels moved (avatar/render/warp.py); "diffusion": learned
    renderer: str = "retrieval"
    warp_max_size: int = 384  # the warp works on a crop at the face's own resolution, up to this side
    diffusion_start: float = 0.25  # the diffusion renderer refines the warp renderer's draft noised to this time (1: draws from pure noise)
    steps: int = 0  # diffusion sampling steps (0: the model's own few-step count × diffusion_start, at least 1)
    batch: int = 8  # crops per diffusion call
    seed: int = 0  # renderer noise, shared by every frame (temporal stability)
    colour_match: float = 0.8  # pull the repainted colour towards the frame's (0: off, 1: full)
    detail: bool = True  # restore the frame's fine detail where it agrees with the rendering (faces larger than the crop)
    watermark: bool = True  # the invisible "synthetic" mark in the repainted region
    drift: bool = True  # identity-drift monitoring of sampled output frames
    drift_references: int = 8  # frames of a video kept as identity references for the drift monitor (dub)
    crf: int = 17  # H.264 quality of the output (lower is better)
    # x264's speed/size trade-off; on a 512² clip "veryfast" at crf 17 took 12.3 CPU-ms a frame against "fast" at crf 18's
    # 26.8, for 0.26 dB less PSNR (38.02 against 38.28) and 6.5% more bytes ("medium" at 18: 38.26 dB, 1.3× "fast"'s time)
    preset: str = "veryfast"
    threads: int = 0  # onnxruntime threads (0: its default)
    # onnxruntime threads of the speech encoder and the motion models (0: `threads`); live, 1: they hear the next audio
    # while the frame pool renders (realtime/engine.py), and more threads there only contend with the pool's
    speech_threads: int = 0
    workers: int = 0  # threads for the per-frame CPU work of a batch (warp, condition, paste-back); 0: one per core, at most 8
    fp16: bool = True  # the diffusion renderer computes in half precision on CUDA/TensorRT (no effect on CPU)
    # render each batch through one ONNX graph (avatar/render/graph.py: crop, warp, denoiser, composite) instead of the
    # per-frame path; made for GPU hosts: on CPU the per-frame path is faster (benchmarks/graph.py)
    frame_graph: bool = False
    max_minutes: float = 60.0  # longest output made without asking: a longer one is refused before any work (raise it for long jobs)

    def __post_init__(self):
        check_ranges(self, ("fps", "max_side", "warp_max_size", "steps", "batch", "colour_match", "drift_references", "crf",
                            "threads", "speech_threads", "workers", "max_minutes"))
        require(self.preset in X264_PRESETS, f"--preset must be one of {', '.join(X264_PRESETS)}, not {self.preset!r}")
        require(0 < self.diffusion_start <= 1, f"--diffusion-start must be in (0, 1] (1: from pure noise), not {self.diffusion_start}")


@dataclass(frozen=True)
class DubConfig:
    """How `avatar dub` fits the new speech to the video."""

    audio_longer: str = "pingpong"  # pingpong: play the video back and forth, turning at a still moment; loop; trim (cut the speech)
    audio_shorter: str = "trim"  # trim: end the video with the speech; keep: keep the whole video, the mouth at rest after the speech


# The pipeline's settings live: the warp's crop capped at 160 px (a 360-px face costs 35 ms a frame at 384, 21 at 256,
# 12 at 160 on 2 cores), one diffusion step from the warp's draft, portraits scaled to 512 px.
LIVE_PIPELINE = PipelineConfig(warp_max_size=160, steps=1, max_side=512, speech_threads=1)


@dataclass(frozen=True)
class RealtimeConfig:
    """The live engine and its server (`realtime/`). `pipeline`: the renderer and frame settings, the
    same options as `animate`'s (`--renderer`, `--warp-max-size`, `--fps`, `--batch`, ...; live
    defaults in LIVE_PIPELINE), less those that mean nothing live (`cli_hidden`)."""

    cli_hidden: typing.ClassVar[typing.Dict[str, typing.Tuple[str, ...]]] = {
        "pipeline": ("crf", "preset", "max_minutes", "drift", "drift_references")}

    pipeline: PipelineConfig = LIVE_PIPELINE
    jpeg_quality: int = 85
    max_backlog_s: float = 0.3  # frames whose audio is older than this are not rendered but repeated (counted as dropped)
    drift_every_s: float = 2.0  # identity-drift sample interval per session (0: off)
    # Server limits
    max_sessions: int = 4
    admission: bool = True  # refuse a session the server cannot serve in real time (503 with the reason), by measured load
    max_load: float = 1.0  # ... when the sessions' measured load (1.0: the renderer's whole time) would pass this
    max_latency_s: float = 1.0  # a frame whose audio reached the server longer ago than this is not sent (dropped, counted)
    encode_workers: int = 0  # threads encoding the streams' frames (JPEG / H.264) off the render thread; 0: one per core, at most 8
    max_message_bytes: int = 1 << 20
    idle_timeout_s: float = 30.0  # close a connection that sends nothing for this long
    client_queue_frames: int = 25  # frames waiting for a slow client; older ones are dropped first
    silence_after_s: float = 0.5  # no audio for this long: feed silence (this far behind real time), the avatar idles

    @property
    def fps(self) -> float:
        return self.pipeline.fps

    def __post_init__(self):
        check_ranges(self, ("jpeg_quality", "max_backlog_s", "drift_every_s", "max_sessions", "max_load", "max_latency_s",
                            "encode_workers", "client_queue_frames", "idle_timeout_s", "silence_after_s"))
