"""The README's enrollment contact sheet: one held-out person's mouth, every second frame, four ways.

    python -m benchmarks.enroll_sheet [--video ../shared/data/video/yerfor__MimicTalk/German_20s.mp4]
                                      [--speech assets/samples/speech.flac] [--start 40] [--out docs/images/enrolled_vs_photo.jpg]

Rows: `dub --no-enroll` (the generic path), `dub --avatar` (the clip enrolled), `animate --avatar`
(its idle loop behind the mouth) and `animate --image` of the clip's first frame. Every tile is cut
at one box, round the lips of the first row's first tile (re-tracked), so the rows line up.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import tempfile

import cv2
import numpy as np

from avatar import media
from avatar.config import DubConfig, PipelineConfig
from avatar.face import landmarks as lm
from avatar.face.tracker import FaceTracker
from avatar.pipeline import AvatarPipeline
from benchmarks.sync import DATA

ROWS = ("dub --no-enroll (generic)", "dub --avatar (enrolled)", "animate --avatar (idle loop)", "animate --image (photo)")
TILE, TILES, LABEL = 150, 10, 18


def mouth_box(frame: np.ndarray) -> tuple:
    """`(x0, y0, x1, y1)`: a box round the lips of the face in `frame`, 1.8 lip widths wide and 1.62 high."""
    with FaceTracker() as tracker:
        lips = tracker.select(frame, what="frame").landmarks[lm.LIPS_OUTER, :2]
    cx, cy = lips.mean(0)
    half = np.ptp(lips[:, 0]) * 0.9
    return max(0, int(cx - half)), max(0, int(cy - half * 0.9)), int(cx + half), int(cy + half * 0.9)


def strip(video: pathlib.Path, label: str, start: int, box: tuple) -> np.ndarray:
    """One labelled row: TILES tiles of every second frame from `start`, cut at `box`, numbered."""
    frames = [f for _, f in media.iter_video_frames(video)][start:start + 2 * TILES:2]
    x0, y0, x1, y1 = box
    height = int(TILE * (y1 - y0) / (x1 - x0))
    tiles = []
    for k, frame in enumerate(frames):
        tile = cv2.resize(frame[y0:y1, x0:x1], (TILE, height), interpolation=cv2.INTER_AREA)
        cv2.putText(tile, str(start + 2 * k), (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 230, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    head = np.zeros((LABEL, TILE * len(tiles), 3), np.uint8)
    cv2.putText(head, label, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([head, np.concatenate(tiles, 1)], 0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=pathlib.Path, default=DATA / "video/yerfor__MimicTalk/German_20s.mp4")
    parser.add_argument("--speech", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1] / "assets/samples/speech.flac")
    parser.add_argument("--start", type=int, default=40)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/images/enrolled_vs_photo.jpg"))
    args = parser.parse_args(argv)
    pipeline = AvatarPipeline.from_pretrained(config=PipelineConfig(drift=False))
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        avatar = pipeline.enroll([args.video], progress=False)
        photo = folder / "photo.png"
        cv2.imwrite(str(photo), cv2.cvtColor(next(iter(media.iter_video_frames(args.video)))[1], cv2.COLOR_RGB2BGR))
        keep = DubConfig(audio_shorter="keep")
        outputs = [folder / f"{k}.mp4" for k in range(len(ROWS))]
        pipeline.dub(args.video, args.speech, outputs[0], keep, progress=False, enroll=False)
        pipeline.dub(args.video, args.speech, outputs[1], keep, progress=False, avatar=avatar)
        pipeline.animate(None, args.speech, outputs[2], progress=False, avatar=avatar)
        pipeline.animate(photo, args.speech, outputs[3], progress=False)
        box = mouth_box(list(itertools.islice(media.iter_video_frames(outputs[0]), args.start + 1))[-1][1])
        sheet = np.concatenate([strip(path, label, args.start, box) for path, label in zip(outputs, ROWS)], 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), sheet[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
