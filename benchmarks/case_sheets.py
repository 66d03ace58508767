"""Before/after contact sheets of issue 13's cases that have no sheet elsewhere: a 3/4 view, a tight
160×160 crop and a head tilting and rolling fast (the "melting face"), each rendered by two checkouts
of the engine and shown as rows of the lower face over consecutive moments.

    git worktree add /tmp/before b553ff4                  # the code before issue 13's work
    python -m benchmarks.case_sheets render --checkout /tmp/before --out out/cases/before
    python -m benchmarks.case_sheets render --checkout . --out out/cases/after
    python -m benchmarks.case_sheets sheet --before out/cases/before --after out/cases/after --out docs/images/cases_before_after.jpg

`render` runs that checkout's own command line (`python -m avatar.cli`, this interpreter) with its
own models on inputs from ../shared/data: `animate` of a frame of a PC-AVS clip whose speaker is
turned about 40° and of a 160×160 frame of a deep_avsr clip, and `dub` of the StyleTalk clip whose
head tilts 30° down and rolls; all with the first 2 s of a LibriSpeech clip.

    python -m benchmarks.case_sheets rows --videos A.mp4 B.mp4 ... --title T --start 0 --out X.jpg

`rows`: any videos of one picture (the same clip dubbed by two checkouts), a row each.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import typing

import cv2
import numpy as np

from avatar import media
from avatar.face import landmarks as lm

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
TURNED = DATA / "video/Hangz-nju-cuhk__Talking-Face_PC-AVS/00002.mp4"
SMALL = DATA / "video/smeetrs__deep_avsr/00006.mp4"
TILTED = DATA / "video_silent/FuxiVirtualHuman__styletalk/furious_talk2_clip7.mp4"
SPEECH = DATA / "speech/resemble-ai__Resemblyzer/19-198-0000.flac"
CASES = {"three_quarter": "3/4 view (40°)", "small": "160×160 crop", "tilted": "head tilting and rolling fast"}
TILE = (128, 90)  # width, height of one moment


def write_rgb(path: pathlib.Path, image: np.ndarray) -> None:
    """An RGB `(H, W, 3) uint8` image (PNG lossless, JPEG at quality 88)."""
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 88]):
        raise OSError(f"could not write {path}")


def prepare(folder: pathlib.Path) -> None:
    """The inputs: `three_quarter.png` (the PC-AVS frame turned nearest 40°), `small.png`, `speech.wav`."""
    from avatar.face.video import align_video

    folder.mkdir(parents=True, exist_ok=True)
    tracked = list(align_video(media.iter_video_frames(TURNED)))
    yaw = np.array([abs(float(lm.yaw_degrees(t.frame_landmarks))) if t.valid else 0.0 for t in tracked])
    write_rgb(folder / "three_quarter.png", tracked[int(np.argmin(np.abs(yaw - 40)))].image)
    write_rgb(folder / "small.png", media.read_video(SMALL, max_frames=6, with_audio=False).frames[5])
    media.write_audio(folder / "speech.wav", media.read_audio(SPEECH)[:32000])


def render(checkout: pathlib.Path, out: pathlib.Path) -> None:
    """Each case through `checkout`'s command line into `out/<case>.mp4`."""
    out = out.resolve()
    prepare(out / "inputs")
    speech = str(out / "inputs/speech.wav")
    runs = {"three_quarter": ["animate", "--image", str(out / "inputs/three_quarter.png")],
            "small": ["animate", "--image", str(out / "inputs/small.png")],
            "tilted": ["dub", "--video", str(TILTED)]}
    for case, args in runs.items():
        done = subprocess.run([sys.executable, "-m", "avatar.cli", *args, "--audio", speech, "--output", str(out / f"{case}.mp4"),
                               "--quiet"], cwd=checkout, capture_output=True, text=True)
        print(f"{case}: exit {done.returncode} {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")


def lower_face(frame: np.ndarray, landmarks: np.ndarray, tile: typing.Tuple[int, int] = TILE, below: float = 0.72) -> np.ndarray:
    """The lower face of `frame` around the tracked `landmarks (478, 2+)`, as one `tile` (width,
    height), centred `below` the top of the face (as a share of its height)."""
    points = landmarks[:, :2]
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    half = 0.5 * (x1 - x0)
    cx, cy = (x0 + x1) / 2, y0 + below * (y1 - y0)
    aspect = tile[1] / tile[0]
    box = np.array([cx - half, cy - aspect * half, cx + half, cy + aspect * half]).round().astype(int)
    pad = int(max(0, -box.min(), box[2] - frame.shape[1], box[3] - frame.shape[0]))
    padded = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT)
    return cv2.resize(padded[box[1] + pad:box[3] + pad, box[0] + pad:box[2] + pad], tile, interpolation=cv2.INTER_AREA)


def sheet(before: pathlib.Path, after: pathlib.Path, out: pathlib.Path, moments: int = 9) -> None:
    """Per case, a row of the input's moments, the `before` row and the `after` row; one image."""
    from avatar.face.video import align_video

    blocks = []
    for case, title in CASES.items():
        if case == "tilted":
            source = media.read_video(TILTED, with_audio=False).frames
            picks = np.arange(24, 24 + 2 * moments, 2)  # where the head tilts down and rolls
        else:
            image = media.read_image(before / "inputs" / f"{case}.png")
            source = [image] * 50
            picks = np.linspace(4, 45, moments).round().astype(int)
        tracked = list(align_video(((i / 25, source[i]) for i in picks)))
        rows = [np.hstack([lower_face(source[i], t.frame_landmarks) for i, t in zip(picks, tracked)])]
        for folder in (before, after):
            frames = media.read_video(folder / f"{case}.mp4", with_audio=False).frames
            rows.append(np.hstack([lower_face(frames[i], t.frame_landmarks) for i, t in zip(picks, tracked)]))
        label = np.full((22, rows[0].shape[1], 3), 255, np.uint8)
        cv2.putText(label, f"{title}: input / before / after", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        blocks.append(np.vstack([label, *rows]))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rgb(out, np.vstack(blocks))
    print(f"wrote {out}")


def rows(videos: typing.Sequence[pathlib.Path], title: str, out: pathlib.Path, start: int = 0, moments: int = 9, step: int = 2) -> None:
    """Any videos of one picture (e.g. one clip dubbed by two checkouts), a row each of the lower face
    at the same moments (`start`, every `step` frames), cut at the first video's face, from the
    nose to below the chin."""
    from avatar.face.video import align_video

    picks = np.arange(start, start + step * moments, step)
    clips = [media.read_video(video, with_audio=False).frames for video in videos]
    tracked = list(align_video(((i / 25, clips[0][i]) for i in picks)))
    tile = (TILE[0], TILE[0])
    label = np.full((22, tile[0] * moments, 3), 255, np.uint8)
    cv2.putText(label, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rgb(out, np.vstack([label] + [np.hstack([lower_face(frames[i], t.frame_landmarks, tile, 0.9) for i, t in zip(picks, tracked)])
                                        for frames in clips]))
    print(f"wrote {out}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("render", help="render the cases with a checkout's command line")
    run.add_argument("--checkout", type=pathlib.Path, required=True)
    run.add_argument("--out", type=pathlib.Path, required=True)
    make = commands.add_parser("sheet", help="the before/after sheet")
    make.add_argument("--before", type=pathlib.Path, required=True)
    make.add_argument("--after", type=pathlib.Path, required=True)
    make.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/images/cases_before_after.jpg"))
    line = commands.add_parser("rows", help="rows of the lower face of any videos of one picture, at the same moments")
    line.add_argument("--videos", type=pathlib.Path, nargs="+", required=True)
    line.add_argument("--title", default="")
    line.add_argument("--start", type=int, default=0)
    line.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "render":
        render(args.checkout, args.out)
    elif args.command == "rows":
        rows(args.videos, args.title, args.out, args.start)
    else:
        sheet(args.before, args.after, args.out)


if __name__ == "__main__":
    main()
