"""Held-out report for the motion model, with the baselines in the same run.

    python -m training.eval_motion --cache cache [--live] [--model assets/motion_offline.onnx] [--json report.json]

Runs the ONNX model (the engine's default for files, or with `--live` for live streams) through onnxruntime on every validation clip with speech
(people never seen in training; see training/split.py) and prints, next to the model: the rest pose
(closed mouth), the model driven by mismatched speech (another person's clip), the mouth-opening
correlation with the real video, the audio-offset sweep (±1..5 frames; the error must be lowest
at 0), and the real opening's row (every point from the real inner-lip gap by a linear map fitted on
the training people: what a model that got the opening exactly right, and moved every other point
only with it, would score). What is measured is documented in training/motion_eval.py.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from avatar import media
from avatar.errors import AvatarError
from avatar.motion.runner import MotionPredictor
from training.common import emit_report
from training.motion_data import load_motion_clips
from training.cache import open_cache
from training.closures import bilabial_spans, grid_code
from training.export_speech import grid_sentence
from training.motion_eval import evaluate_motion, format_people, format_summary, opening_oracle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval_motion", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=pathlib.Path, required=True, help="preprocessing cache (training.preprocess)")
    parser.add_argument("--model", type=pathlib.Path, default=None, help="ONNX model (default: assets/motion_offline.onnx)")
    parser.add_argument("--live", action="store_true", help="the live model (default: assets/motion_live.onnx)")
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument("--src", type=pathlib.Path, default=pathlib.Path("../shared/data"),
                        help="the media the cache was made from (GRID clips' audio, for the /p b m/ closure measure)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the full report here")
    args = parser.parse_args(argv)
    try:
        predictor = MotionPredictor(args.model, live=args.live)
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    clips = load_motion_clips(args.cache, args.split)
    if not clips:
        print(f"error: no {args.split} clips with speech in {args.cache}; run training.preprocess first", file=sys.stderr)
        return 2
    bilabials = {}
    for clip in open_cache(args.cache, split=args.split, kind="video"):
        code = grid_code(clip.meta["file"])
        if code and (args.src / clip.meta["file"]).exists():
            samples = media.read_audio(args.src / clip.meta["file"], 16000)
            bilabials[clip.clip_id] = bilabial_spans(samples, grid_sentence(code))
    oracle = opening_oracle(load_motion_clips(args.cache, "train"))
    report = evaluate_motion(predictor.predict, clips, predictor.config, bilabials=bilabials, oracle=oracle)
    title = f"{'live' if predictor.live else 'offline'} model {args.model or ''}".rstrip()
    emit_report(title + "\n" + format_summary(report["summary"]) + "\n" + format_people(report["clips"]), report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
