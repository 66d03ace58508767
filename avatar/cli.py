"""The `avatar` command: the only argv parser, built from the dataclass configs.

Every user error ends in one line, `error: <what is wrong and what to do>`, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import typing

from avatar import __version__
from avatar.config import AlignConfig, FaceConfig, MelConfig, VadConfig, add_config_arguments, config_from_args
from avatar.errors import AvatarError


def _run_inspect(args: argparse.Namespace) -> int:
    from avatar.inspect import inspect_frontends

    result = inspect_frontends(
        args.output, image=args.image, video=args.video, audio=args.audio, fps=args.fps,
        face_config=config_from_args(args, FaceConfig, "face"), align_config=config_from_args(args, AlignConfig, "align"),
        mel_config=config_from_args(args, MelConfig, "mel"), vad_config=config_from_args(args, VadConfig, "vad"),
        progress=not args.quiet, motion=not args.no_motion,
    )
    print(f"front-ends{'' if args.no_motion else ' and motion model (magenta: lips and jaw predicted from the speech)'}; "
          f"the renderer is not trained yet, so the face itself does not move: "
          f"{result.n_frames} frames at {result.fps:g} fps, {result.audio_seconds:.1f} s of audio, "
          f"speech in {100 * result.speech_fraction:.0f}% of frames, face in {result.face_frames}, "
          f"{result.seconds:.1f} s")
    print(f"wrote {result.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar", description="Speech-driven talking-head engine.")
    parser.add_argument("--version", action="version", version=f"avatar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect", help="show what the front-ends see and the mouth the motion model predicts from the speech",
        description="Write a video of the front-ends' view of a face (photo or video) and speech, with the motion "
                    "model's predicted lips and jaw.")
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="portrait photo (PNG/JPEG/...)")
    source.add_argument("--video", help="video with a face (its own audio is used unless --audio is given)")
    inspect.add_argument("--audio", help="speech (wav/flac/mp3/m4a/ogg/... or a video's audio)")
    inspect.add_argument("--output", required=True, help="output mp4")
    inspect.add_argument("--fps", type=float, default=25.0, help="frame rate for a still image (default 25)")
    inspect.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect.add_argument("--no-motion", action="store_true", help="do not run the motion model")
    add_config_arguments(inspect, FaceConfig, "face")
    add_config_arguments(inspect, AlignConfig, "align")
    add_config_arguments(inspect, MelConfig, "mel")
    add_config_arguments(inspect, VadConfig, "vad")
    inspect.set_defaults(run=_run_inspect)
    return parser


def main(argv: typing.Optional[typing.Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
