"""Dataset preprocessing end to end on two real clips, the cache format, and the identity split."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from avatar import audio, media
from conftest import DATA, GRID_CLIP, REPO
from training.cache import decode_landmarks, encode_landmarks, open_cache
from training.split import VALIDATION_IDENTITIES, person_key, split_identities


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    cmd = [sys.executable, "-m", "training.preprocess", "--src", str(DATA), "--out", str(out),
           "--clips", "bbaf2n.mpg", "smeetrs__deep_avsr/00001.mp4", "--crop-sizes", "128", "256", "--workers", "2"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    return out, first.stdout, second.stdout


def test_two_clips_end_to_end(cache):
    out, stdout, _ = cache
    clips = {c.meta["file"]: c for c in open_cache(out)}
    assert set(clips) == {"video/rizkiarm__LipNet/bbaf2n.mpg", "video/smeetrs__deep_avsr/00001.mp4"}
    grid = clips["video/rizkiarm__LipNet/bbaf2n.mpg"]
    assert grid.meta["split"] == "val" and grid.meta["person"] == "GRID-A" and grid.fps == 25
    assert grid.n_frames == 75 and grid.meta["frames"]["kept"] == 75
    crops = grid.crops(128)
    assert crops.shape == (75, 128, 128, 3) and grid.crops(256).shape == (75, 256, 256, 3)
    landmarks = grid.landmarks()
    assert landmarks.shape == (75, 478, 2) and np.isfinite(landmarks).all()
    assert np.allclose(grid.landmarks(256), (landmarks + 0.5) * 2 - 0.5)
    # The cached mel windows are exactly the front-end's on the clip's audio.
    samples = media.read_audio(GRID_CLIP, 16000)
    expected = audio.mel_windows(audio.MelFrontend()(samples), 25, 75)
    np.testing.assert_allclose(grid.mel_windows(), expected, atol=2e-3)  # stored as float16
    vad = grid.arrays["vad"].astype(np.float32)
    assert vad.shape == (75,) and vad[:5].max() < 0.5 and vad.max() > 0.5  # GRID starts silent
    lrs2 = clips["video/smeetrs__deep_avsr/00001.mp4"]
    assert lrs2.meta["split"] == "train"
    reasons = lrs2.arrays["reason"]
    assert sum(lrs2.meta["frames"].values()) == lrs2.n_frames == reasons.size
    assert "frames/s" in stdout and "kept" in stdout and str(out) in stdout


def test_crops_match_the_landmarks(cache):
    """The crop pixels and the crop-space landmarks agree: the mouth is where the landmarks say."""
    out, _, _ = cache
    clip = next(c for c in open_cache(out) if "bbaf2n" in c.clip_id)
    crops, points = clip.crops(128), clip.landmarks()
    from avatar.face.tracker import FaceTracker

    with FaceTracker() as tracker:
        face = tracker.select(np.ascontiguousarray(crops[40]))
    assert np.abs(face.landmarks[:, :2] - points[40]).mean() < 1.5  # re-detection on the H.264 crop


def test_summary_split_and_resume(cache):
    out, _, second = cache
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"] == 2 and summary["clips_resumed"] == 2  # the second run did nothing again
    assert "2 resumed" in second
    assert summary["frames_total"] == summary["frames_kept"] + sum(summary["frames_dropped"].values())
    split = json.loads((out / "split.json").read_text())
    assert tuple(split["people"]["val"]) == VALIDATION_IDENTITIES
    assert split["clips"] == {"train": ["video__smeetrs__deep_avsr__00001"], "val": ["video__rizkiarm__LipNet__bbaf2n"]}


def test_validation_identities_are_the_documented_list():
    with (DATA / "manifest.csv").open() as f:
        people = {person_key(r["identity"], r["file"]) for r in csv.DictReader(f) if r["kind"] in ("video", "video_silent")}
    assert tuple(split_identities(people)["val"]) == VALIDATION_IDENTITIES
    assert person_key("LRQ-apparatus.nicole1.mp4", "video_silent/x/lipreading_words__apparatus.nicole1.mp4") == "LRQ-nicole"
    assert person_key("ST-Obama_clip3", "video_silent/FuxiVirtualHuman__styletalk/Obama_clip3.mp4") == "Obama"


def test_landmark_codec_round_trip():
    rng = np.random.default_rng(0)
    points = np.cumsum(rng.normal(0, 0.3, (50, 478, 2)), axis=0) + 64
    valid = np.ones(50, bool)
    valid[[0, 10, 11, 49]] = False
    points[~valid] = np.nan
    back = decode_landmarks(encode_landmarks(points, valid), valid)
    assert np.isnan(back[~valid]).all()
    assert np.abs(back[valid] - points[valid]).max() <= 0.5 / 64 + 1e-6


def test_missing_manifest_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "training.preprocess", "--src", str(tmp_path), "--out", str(tmp_path / "c")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "manifest.csv" in result.stderr
