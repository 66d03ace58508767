"""The `avatar` command: the only argv parser, built from the dataclass configs.

Every user error ends in one line, `error: <what is wrong and what to do>`, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import threading
import typing

from avatar import __version__
from avatar.config import (AlignConfig, ArtifactConfig, BatchConfig, C2paConfig, DubConfig, FaceConfig, IdentityConfig, IdleConfig,
                           MelConfig, PipelineConfig, RealtimeConfig, SilenceConfig, VadConfig, add_config_arguments, config_from_args)
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
          f"the face pixels are not rendered here (`avatar animate` and `avatar dub` do that): "
          f"{result.n_frames} frames at {result.fps:g} fps, {result.audio_seconds:.1f} s of audio, "
          f"speech in {100 * result.speech_fraction:.0f}% of frames, face in {result.face_frames}, "
          f"{result.seconds:.1f} s")
    print(f"wrote {result.output}")
    return 0


def _pipeline(args: argparse.Namespace):
    from avatar.pipeline import AvatarPipeline

    return AvatarPipeline.from_pretrained(args.models, config=config_from_args(args, PipelineConfig, ""),
                                          face_config=config_from_args(args, FaceConfig, "face"),
                                          identity_config=config_from_args(args, IdentityConfig, "identity"),
                                          silence_config=config_from_args(args, SilenceConfig, "silence"),
                                          artifact_config=config_from_args(args, ArtifactConfig, "artifacts"),
                                          c2pa_config=(config_from_args(args, C2paConfig, "c2pa") if hasattr(args, "c2pa__enabled")
                                                       else C2paConfig(enabled=False)))  # enroll writes no video


def _print_result(result, report: typing.Optional[str]) -> int:
    print(result.summary())
    replaced = (result.report.get("artifacts") or {}).get("frames") or []
    if replaced:
        times = ", ".join(f"{item['t']:.2f} s" for item in replaced[:5]) + (", ..." if len(replaced) > 5 else "")
        print(f"warning: {len(replaced)} frame(s) were not repainted (the artifact check or the pose limit) and show the input "
              f"instead ({times}); see the report")
    if result.report.get("drift") and result.report["drift"]["alarms"]:
        kinds = sorted({a["kind"] for a in result.report["drift"]["alarms"]})
        print(f"warning: identity-drift alarms ({', '.join(kinds)}); see the report for when")
    print(f"wrote {result.output} (labelled synthetic; manifest {result.sidecar})")
    if report:
        print(f"report: {report}")
    return 0


def _run_animate(args: argparse.Namespace) -> int:
    _note_new_folder(args.output)
    pipeline = _pipeline(args)
    avatar = pipeline.load_avatar(args.avatar) if args.avatar else None
    result = pipeline.animate(args.image, args.audio, args.output, config_from_args(args, IdleConfig, "idle"),
                              references=args.reference or (), report=args.report, progress=not args.quiet, avatar=avatar)
    return _print_result(result, args.report)


def _run_dub(args: argparse.Namespace) -> int:
    _note_new_folder(args.output)
    pipeline = _pipeline(args)
    avatar = pipeline.load_avatar(args.avatar) if args.avatar else None
    result = pipeline.dub(args.video, args.audio, args.output, config_from_args(args, DubConfig, ""),
                          references=args.reference or (), report=args.report, progress=not args.quiet, avatar=avatar,
                          enroll=not args.no_enroll)
    return _print_result(result, args.report)


def _run_enroll(args: argparse.Namespace) -> int:
    _note_new_folder(args.output)
    avatar = _pipeline(args).enroll(args.video or (), args.image, args.output, references=args.reference or (),
                                    progress=not args.quiet)
    print(f"enrolled: {avatar.describe()}")
    size = pathlib.Path(args.output).stat().st_size
    print(f"wrote {args.output} ({size / 1e6:.1f} MB); use it with --avatar {args.output}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from avatar import media
    from avatar.evaluate import evaluate_pair, format_evaluation

    if args.json:
        media.check_output_path(args.json, [args.generated, args.real] + ([args.reference] if args.reference else []))
    result = evaluate_pair(args.generated, args.real, args.reference, progress=not args.quiet, second_tracker=args.second_tracker)
    print(format_evaluation(result))
    if args.json:
        with media.atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _run_doctor(args: argparse.Namespace) -> int:
    from avatar.doctor import run_checks

    checks = run_checks()
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    failed = [c.name for c in checks if not c.ok]
    print("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}; run `make install` again")
    return 1 if failed else 0


def _run_batch(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise AvatarError("avatar batch needs Ray: pip install 'avatar-engine[batch]' (or `make install`)")
    from avatar.batch import read_jobs, run

    jobs = read_jobs(args.jobs)
    table = run(jobs, args.output_dir, config_from_args(args, BatchConfig, ""), progress=not args.quiet)
    counts = {status: sum(row["status"] == status for row in table) for status in ("done", "skipped", "failed")}
    for row in table:
        if row["status"] == "failed":
            print(f"failed: {row['job']}: {row['error']}")
    done = [row for row in table if row["status"] == "done"]
    pace = (f"; {sum(r['audio_seconds'] for r in done) / max(sum(r['seconds'] for r in done), 1e-9):.2f} audio s per worker-second"
            if done else "")
    print(f"{len(table)} jobs: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed{pace}")
    print(f"wrote {pathlib.Path(args.output_dir) / 'results.csv'} and results.json")
    return 1 if counts["failed"] else 0


def _run_verify(args: argparse.Namespace) -> int:
    import json

    from avatar.provenance import DETECT_THRESHOLD, verify

    result = verify(args.file, progress=not args.quiet)
    if args.json:  # machine-readable: the JSON alone on stdout
        print(json.dumps(result, indent=1, default=str))
        return 0 if result["synthetic"] else 1
    mark = result["watermark"]
    side = result["sidecar"]
    c2pa = result["c2pa"]
    if not c2pa["present"]:
        print("C2PA Content Credentials: none" + (f" ({c2pa['why_not']})" if c2pa.get("why_not") else ""))
    else:
        actions = ", ".join(f"{a['action']}" + (" (trainedAlgorithmicMedia)" if a.get("digitalSourceType", "") and
                                                "trainedAlgorithmicMedia" in a["digitalSourceType"] else "") for a in c2pa.get("actions", []))
        who = ("signed with an avatar-engine install's own key (untrusted)" if c2pa.get("local_untrusted_signer") else
               f"signed by {c2pa.get('signed_by')}" + (" (credential untrusted here)" if c2pa.get("credential_untrusted") else ""))
        print(f"C2PA Content Credentials: {c2pa.get('validation_state')}" + (f" ({'; '.join(c2pa['errors'])})" if c2pa.get("errors") else "")
              + f"; {actions or 'no actions'}; {who}")
    print(f"container metadata: {'says synthetic' if result['metadata_says_synthetic'] else 'no synthetic label'}"
          + (f" ({result['metadata'].get('comment')})" if result['metadata'].get('comment') else ""))
    print("sidecar manifest: " + ("none" if not side["present"] else
                                   ("present, matches this file" if side.get("matches_file") else "present, but for other bytes (re-encoded or edited)")))
    print(f"watermark: {'found' if mark['found'] else 'not found'} (z = {mark['z']:.1f}, threshold {DETECT_THRESHOLD:g}; "
          f"{mark['face_frames']} of {mark['frames']} frames with a face)")
    print(f"verdict: {'SYNTHETIC' if result['synthetic'] else 'no sign of this engine'}")
    return 0 if result["synthetic"] else 1


def _run_serve(args: argparse.Namespace) -> int:
    from realtime import server  # the only place avatar/ reaches realtime/, lazily

    return server.run(args.image, args.host, args.port, args.token, config_from_args(args, RealtimeConfig, ""),
                      config_from_args(args, IdleConfig, "idle"), avatar=args.avatar,
                      face_config=config_from_args(args, FaceConfig, "face"))


def _run_webcam(args: argparse.Namespace) -> int:
    from realtime import webcam

    return webcam.run(args.image, config_from_args(args, RealtimeConfig, ""), config_from_args(args, IdleConfig, "idle"),
                      avatar_path=args.avatar, face_config=config_from_args(args, FaceConfig, "face"))


def _face_index_option(command: argparse.ArgumentParser) -> None:
    """`--face-index N`: an alias of `--face.face-index` (FaceConfig), the option users look for."""
    command.add_argument("--face-index", dest="face__face_index", type=int, default=None, metavar="N",
                         help="which face to use when there are several (0.. left to right)")


def _live_options(command: argparse.ArgumentParser) -> None:
    """What `serve` and `webcam` share: the portrait or avatar, the live engine's config and the idle motion."""
    person = command.add_mutually_exclusive_group()
    person.add_argument("--image", help="the avatar's portrait (default: the bundled sample)")
    person.add_argument("--avatar", help="an enrolled avatar (`avatar enroll`): its real footage loops behind the speaking mouth")
    _face_index_option(command)
    add_config_arguments(command, RealtimeConfig, "")
    add_config_arguments(command, FaceConfig, "face")
    add_config_arguments(command, IdleConfig, "idle")


def _common_render_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--output", required=True, help="output .mp4 or .mov (.mkv with --no-c2pa.enabled); written atomically, "
                                                          "C2PA-signed, never an input")
    command.add_argument("--report", help="write a JSON report here: timings per stage, frames, drift series and alarms, model hashes")
    command.add_argument("--reference", action="append", metavar="PHOTO",
                         help="another photo of the same person for the identity-drift check (repeatable)")
    _face_index_option(command)
    command.add_argument("--models", help="folder with speech.onnx, motion_offline.onnx, motion_live.onnx and render.onnx (default: the bundled ones)")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(command, PipelineConfig, "")
    add_config_arguments(command, FaceConfig, "face")
    add_config_arguments(command, IdentityConfig, "identity")
    add_config_arguments(command, SilenceConfig, "silence")
    add_config_arguments(command, ArtifactConfig, "artifacts")
    add_config_arguments(command, C2paConfig, "c2pa")


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
    _face_index_option(inspect)
    add_config_arguments(inspect, FaceConfig, "face")
    add_config_arguments(inspect, AlignConfig, "align")
    add_config_arguments(inspect, MelConfig, "mel")
    add_config_arguments(inspect, VadConfig, "vad")
    inspect.set_defaults(run=_run_inspect)

    animate = commands.add_parser(
        "animate", help="a portrait and speech → a talking video",
        description="Animate a still portrait with speech: lips and jaw from the audio, natural blinks and a little "
                    "head motion (turn off with --no-idle.enabled; seed with --idle.seed). 25 fps unless --fps.")
    person = animate.add_mutually_exclusive_group(required=True)
    person.add_argument("--image", help="portrait photo (PNG/JPEG/...; CMYK, 16-bit, alpha and huge images are handled)")
    person.add_argument("--avatar", help="an enrolled avatar (`avatar enroll`): its real footage loops behind the speaking mouth")
    animate.add_argument("--audio", required=True, help="speech (wav/flac/mp3/m4a/ogg/... or a video's audio)")
    _common_render_options(animate)
    add_config_arguments(animate, IdleConfig, "idle")
    animate.set_defaults(run=_run_animate)

    dub = commands.add_parser(
        "dub", help="re-lip-sync a video to new speech",
        description="Repaint the lower face of a video to match new speech; everything outside the lower face stays "
                    "as it was. Speech longer than the video: --audio-longer pingpong (play back and forth, turning "
                    "at a still moment; default), loop, or trim (cut the speech). Speech shorter: --audio-shorter "
                    "trim (default) or keep (the whole video, mouth at rest after the speech).")
    dub.add_argument("--video", required=True, help="video with a face")
    dub.add_argument("--audio", required=True, help="the new speech")
    dub_person = dub.add_mutually_exclusive_group()
    dub_person.add_argument("--avatar", help="an avatar enrolled before from other footage of the same person (default: the "
                                             "video is enrolled on the fly)")
    dub_person.add_argument("--no-enroll", action="store_true", help="do not enroll the video (the generic path: one open mouth)")
    _common_render_options(dub)
    add_config_arguments(dub, DubConfig, "")
    dub.set_defaults(run=_run_dub)

    enroll = commands.add_parser(
        "enroll", help="make a person's avatar from a short video of them (or a photo)",
        description="Enroll a person: from one or more videos of them (a minute or two of speaking to the camera is "
                    "best), their rest mouth, their own mouths (teeth and tongue) for the renderer, a loop of real idle "
                    "footage and a motion model adapted to their speech, in one .avatar file for --avatar.")
    enroll_source = enroll.add_mutually_exclusive_group(required=True)
    enroll_source.add_argument("--video", action="append", help="a video of the person (repeatable)")
    enroll_source.add_argument("--image", help="a photo of the person (a photo-only avatar)")
    enroll.add_argument("--output", required=True, help="the avatar file to write (.avatar)")
    enroll.add_argument("--reference", action="append", metavar="PHOTO", help="another photo of the person for the identity-drift check")
    _face_index_option(enroll)
    enroll.add_argument("--models", help="folder with the model files (default: the bundled ones)")
    enroll.add_argument("--quiet", action="store_true", help="no progress bar")
    for cls, prefix in ((PipelineConfig, ""), (FaceConfig, "face"), (IdentityConfig, "identity"), (SilenceConfig, "silence"),
                        (ArtifactConfig, "artifacts")):
        add_config_arguments(enroll, cls, prefix)
    enroll.set_defaults(run=_run_enroll)

    evaluate = commands.add_parser(
        "eval", help="lip-sync, identity, sharpness, flicker and A/V-offset metrics for a generated video",
        description="Compare a generated video with the real one, frame by frame (the model cards' metrics).")
    evaluate.add_argument("--generated", required=True, help="the generated video")
    evaluate.add_argument("--real", required=True, help="the real video of the same speech")
    evaluate.add_argument("--reference", help="a photo of the person for the identity distance (default: frames of --real)")
    evaluate.add_argument("--second-tracker", action="store_true",
                          help="also measure the mouth-opening r with dlib's 68-point tracker, independent of the engine's own")
    evaluate.add_argument("--json", help="also write the metrics as JSON here")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=_run_eval)

    doctor = commands.add_parser("doctor", help="check the install: versions, providers, models, face front-end, codecs",
                                 description="Run every part once; exit 1 if anything is broken.")
    doctor.set_defaults(run=_run_doctor)

    verify = commands.add_parser(
        "verify", help="is this video made by this engine? (C2PA, metadata, manifest, watermark)",
        description="Report the synthetic labels of a video: its C2PA Content Credentials, container metadata, the "
                    ".provenance.json sidecar and the invisible watermark. Exit 0 when it is labelled synthetic, 1 when no "
                    "label is found.")
    verify.add_argument("file", help="the video to check")
    verify.add_argument("--json", action="store_true", help="print the full result as JSON instead (nothing else on stdout)")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(run=_run_verify)

    batch = commands.add_parser(
        "batch", help="many dubs or animations on Ray: a jobs file in, a folder of outputs and a results table out",
        description="Run the jobs of a CSV (with a header) or JSONL file, one a line: video (dub) or image/avatar "
                    "(animate), audio, output (a name in --output-dir), and optionally renderer, audio_longer, "
                    "audio_shorter; paths relative to the jobs file. Workers are Ray actors with the models loaded; a "
                    "local Ray by default. Jobs whose output exists with the same inputs and models are skipped. "
                    "Writes results.csv and results.json; exit 1 if a job failed. Needs the batch extra (ray).")
    batch.add_argument("jobs", help="the jobs file (.csv or .jsonl)")
    batch.add_argument("--output-dir", required=True, help="where the outputs and the results table go")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(batch, BatchConfig, "")
    batch.set_defaults(run=_run_batch)

    serve = commands.add_parser(
        "serve", help="live avatar over WebSocket, with a browser page",
        description="Stream a live avatar: clients send speech (PCM) over a WebSocket and get frames with timestamps "
                    "and the audio back; GET / is a browser page that uses the microphone. Protocol: realtime/protocol.py.")
    _live_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token", default=os.environ.get("AVATAR_TOKEN"),
                       help="the token clients must give (default: $AVATAR_TOKEN, else a random one, printed)")
    serve.set_defaults(run=_run_serve)

    webcam = commands.add_parser("webcam", help="microphone → live avatar → virtual camera",
                                 description="Needs the realtime extra, a microphone and a virtual camera (v4l2loopback).")
    _live_options(webcam)
    webcam.set_defaults(run=_run_webcam)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP clean up like Ctrl-C: no partial output is left


def _note_new_folder(output: typing.Optional[str]) -> None:
    """Say so when an output's folder does not exist yet (it is created)."""
    if output:
        folder = pathlib.Path(output).parent
        if str(folder) not in ("", ".") and not folder.exists():
            print(f"note: creating the folder {folder}")


def main(argv: typing.Optional[typing.Sequence[str]] = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name) and threading.current_thread() is threading.main_thread():
            signal.signal(getattr(signal, name), _interrupt)
    try:
        return args.run(args)
    except AvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():  # a second signal must not escape the shutdown
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                if hasattr(signal, name):
                    signal.signal(getattr(signal, name), signal.SIG_IGN)
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
