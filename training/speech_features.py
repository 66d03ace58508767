"""Speech-encoder features of every cached talking clip, and of background noise, for motion training.

    python -m training.speech_features --src ../shared/data --cache cache [--variants 3] [--model assets/speech.onnx] [--live-int8]

Per talking clip with audio, `<clip>/speech.npz` holds, for each variant v (0: the clip's own audio;
1..: the same audio at another level with a background-noise recording mixed in at 5-30 dB SNR):
`offline_<v>` and `live_<v>`, `(K, D) float16` encoder frames at 50 frames/s, exactly what the engine
computes (`SpeechEncoder.features(..., live=False/True)`; live windows through the float graph, as on
a GPU, unless `--live-int8`: the CPU's int8 approximation, `SpeechConfig.live_int8`), of the clip's
audio with `PAD_S` seconds of digital silence before and after it (noise, in the noisy variants, runs
through the pads): frame k is at 20 k ms − PAD_S[0] of the clip's time, so the video frame at time t
reads position 50 (t + PAD_S[0]).
The pads teach the motion models that the mouth rests when speech stops (`pad_s` is stored too).

With `--speech-only` (default), the speech clips of the manifest (no video: 9 languages) get
`<cache>/speech_only/<id>.npz` with `offline_<v>` and `live_<v>` for 2 variants (clean, noisy): the
offline model labels them to teach the live one (`training.train_motion --teacher`). `<cache>/speech_noise.npz` holds `offline_<i>` and
`live_<i>` for digital silence, the noise recordings alone and the training clips' own room tone
(their quiet stretches between words, looped): their target is the closed mouth.
Resumable: clips whose file has the requested variants and model hash are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import typing

import numpy as np
from tqdm import tqdm

from avatar import media
from avatar.provenance import file_sha256
from avatar.config import SpeechConfig
from avatar.runtime import asset_path
from avatar.speech.encoder import DEFAULT_MODEL, SpeechEncoder
from training.cache import open_cache
from training.preprocess import clip_id_for, read_manifest

SAMPLE_RATE = 16000
PAD_S = (1.0, 1.5)  # silence before and after each clip's audio


def noise_recording(rng: np.random.Generator, n: int, kind: str, level_dbfs: float) -> np.ndarray:
    """`(n,) float32` background noise made here: white, pink, brown, or mains hum with harmonics, at `level_dbfs` RMS."""
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        base = rng.choice([50.0, 60.0])
        signal = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * base * h * t + rng.uniform(0, 6.3)) for h in range(1, 6))
        signal = signal + 0.05 * rng.normal(0, 1, n)
    else:
        spectrum = np.fft.rfft(rng.normal(0, 1, n))
        freqs = np.maximum(np.fft.rfftfreq(n, 1 / SAMPLE_RATE), 1.0)
        spectrum /= {"white": 1.0, "pink": np.sqrt(freqs), "brown": freqs}[kind]
        signal = np.fft.irfft(spectrum, n)
    return (signal / np.sqrt(np.mean(signal ** 2)) * 10 ** (level_dbfs / 20)).astype(np.float32)


def noisy_variant(samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The speech at another level (−12 to +4 dB, clipped at full scale) with noise at 5–30 dB SNR."""
    gain = 10 ** (rng.uniform(-12, 4) / 20)
    speech = samples * gain
    level = 10 * np.log10(np.mean(speech ** 2) + 1e-12)
    kind = ("white", "pink", "brown", "hum")[rng.integers(4)]
    noise = noise_recording(rng, samples.size, kind, level - rng.uniform(5, 30))
    return np.clip(speech + noise, -1, 1).astype(np.float32)


def noise_set(seed: int = 0, seconds: float = 4.0, count: int = 24) -> typing.List[np.ndarray]:
    """Digital silence and background noise without speech (−72 to −38 dBFS), `(n,) float32` each."""
    rng = np.random.default_rng(10_000 + seed)
    n = int(seconds * SAMPLE_RATE)
    out = [np.zeros(n, np.float32)]
    for i in range(count):
        out.append(noise_recording(rng, n, ("white", "pink", "brown", "hum")[i % 4], rng.uniform(-72, -38)))
    return out


def loop_with_crossfade(piece: np.ndarray, length: int, fade: int = 1600) -> np.ndarray:
    """Loop a short recording to `length` samples with 100 ms crossfades (no clicks at the seams)."""
    fade = min(fade, piece.size // 2)
    out = piece.copy()
    ramp = np.linspace(0, 1, fade, dtype=np.float32)
    while out.size < length:
        joined = out[-fade:] * (1 - ramp) + piece[:fade] * ramp
        out = np.concatenate([out[:-fade], joined, piece[fade:]])
    return out[:length]


def room_tones(samples: np.ndarray, vad: np.ndarray, fps: float, seconds: float = 4.0, min_s: float = 0.4) -> typing.List[np.ndarray]:
    """The clip's own background between words (runs of frames with voice activity < 0.2 lasting
    ≥ `min_s`, trimmed by 2 frames each side), each looped to `seconds`."""
    quiet = np.concatenate([[False], vad < 0.2, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    out = []
    for start, end in zip(edges[::2] + 2, edges[1::2] - 2):
        piece = samples[int(start / fps * SAMPLE_RATE) : int(end / fps * SAMPLE_RATE)]
        if piece.size >= min_s * SAMPLE_RATE:
            out.append(loop_with_crossfade(piece.astype(np.float32), int(seconds * SAMPLE_RATE)))
    return out


def features_of(encoder: SpeechEncoder, samples: np.ndarray) -> typing.Dict[str, np.ndarray]:
    return {"offline": encoder.features(samples).astype(np.float16), "live": encoder.features(samples, live=True).astype(np.float16)}


def save_arrays(target: pathlib.Path, arrays: typing.Dict[str, np.ndarray]) -> None:
    """Write an npz whole or not at all (a temporary file renamed into place)."""
    tmp = target.with_name(target.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(target)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.speech_features", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=pathlib.Path, default=pathlib.Path("../shared/data"))
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--model", type=pathlib.Path, default=None, help=f"speech encoder (default: assets/{DEFAULT_MODEL})")
    parser.add_argument("--variants", type=int, default=3, help="the clean audio and variants − 1 noisy copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speech-only", action=argparse.BooleanOptionalAction, default=True,
                        help="also the manifest's speech clips without video (for distillation)")
    parser.add_argument("--live-int8", action="store_true",
                        help="live features in int8 as the engine computes them on the CPU (SpeechConfig.live_int8), to "
                             "measure the engine's figures; default: the float graph's, which the models are trained on")
    parser.add_argument("--live-window", type=int, default=SpeechConfig.live_window,
                        help="encoder frames each live window hears (SpeechConfig.live_window; the live motion model is "
                             "trained on the features of one window length)")
    args = parser.parse_args(argv)
    model = args.model or asset_path(DEFAULT_MODEL)
    encoder = SpeechEncoder(model, config=dataclasses.replace(SpeechConfig(), live_int8=args.live_int8, live_window=args.live_window),
                            providers=["CPUExecutionProvider"] if args.live_int8 else None)
    config = encoder.config
    digest = (f"{file_sha256(model)} live {config.live_window}/{config.live_hop}/{config.live_right}/{config.live_phase}/{config.live_ahead} "
              f"floor {config.log_floor} int8 {encoder.live_int8}")  # what the features depend on
    clips = [c for c in open_cache(args.cache, kind="video") if c.has_audio]
    if not clips:
        print(f"error: no cached clips with audio in {args.cache}; run training.preprocess first", file=sys.stderr)
        return 2
    quiet: typing.List[np.ndarray] = []
    for clip in tqdm(clips, desc="clips", unit="clip"):
        target = clip.folder / "speech.npz"
        samples = media.read_audio(args.src / clip.meta["file"], SAMPLE_RATE)
        if clip.meta["split"] == "train":  # room tone for the silence sequences: training people only
            quiet += room_tones(samples, clip.arrays["vad"].astype(np.float32), clip.fps)
        if target.exists():
            with np.load(target) as old:
                if str(old["model"]) == digest and all(f"live_{v}" in old for v in range(args.variants)) \
                        and "pad_s" in old and tuple(old["pad_s"]) == PAD_S:
                    continue
        rng = np.random.default_rng([args.seed, int.from_bytes(clip.clip_id.encode()[:8].ljust(8, b"\0"), "little")])
        arrays: typing.Dict[str, np.ndarray] = {"model": np.array(digest), "pad_s": np.array(PAD_S)}
        padded = np.concatenate([np.zeros(int(PAD_S[0] * SAMPLE_RATE), np.float32), samples,
                                 np.zeros(int(PAD_S[1] * SAMPLE_RATE), np.float32)])
        for v in range(args.variants):
            audio = padded if v == 0 else noisy_variant(padded, rng)
            for mode, values in features_of(encoder, audio).items():
                arrays[f"{mode}_{v}"] = values
        save_arrays(target, arrays)
    speech_rows = read_manifest(args.src, ["speech"], suffixes=None) if args.speech_only else []
    folder = args.cache / "speech_only"
    folder.mkdir(exist_ok=True)
    for row in tqdm(speech_rows, desc="speech-only clips", unit="clip"):
        target = folder / f"{clip_id_for(row['file'])}.npz"
        if target.exists():
            with np.load(target) as old:
                if str(old["model"]) == digest:
                    continue
        samples = media.read_audio(args.src / row["file"], SAMPLE_RATE)
        rng = np.random.default_rng([args.seed, len(row["file"]), samples.size])
        arrays = {"model": np.array(digest)}
        for v, audio in enumerate((samples, noisy_variant(samples, rng))):
            for mode, values in features_of(encoder, audio).items():
                arrays[f"{mode}_{v}"] = values
        save_arrays(target, arrays)
    arrays = {"model": np.array(digest)}
    for i, samples in enumerate(noise_set(args.seed) + quiet):
        for mode, values in features_of(encoder, samples).items():
            arrays[f"{mode}_{i}"] = values
    save_arrays(args.cache / "speech_noise.npz", arrays)
    (args.cache / "speech_features.json").write_text(json.dumps({"model": digest, "variants": args.variants, "clips": len(clips)}) + "\n")
    print(f"speech features of {len(clips)} clips ({args.variants} variants), {len(speech_rows)} speech-only clips, "
          f"{len(noise_set(args.seed))} noise recordings and {len(quiet)} stretches of the training clips' room tone in {args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
