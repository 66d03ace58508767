"""Shared fixtures: the real media in ../shared/data (read in place, never written)."""

import os
import pathlib
import tempfile

import numpy as np
import pytest

# This install's own C2PA key (avatar/credentials.py) is made per test run, not in the user's home
# (each pytest worker imports this file: each has its own; the commands it runs inherit it).
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="avatar-tests-data-")

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()

GRID_CLIP = DATA / "video/rizkiarm__LipNet/bbaf2n.mpg"  # MPEG-1, 360x288, GRID-A (validation person)
LRS2_CLIP = DATA / "video/smeetrs__deep_avsr/00001.mp4"  # MPEG-4 part 2, 160x160
LRS2_YAW_CLIP = DATA / "video/smeetrs__deep_avsr/00009.mp4"  # profile / three-quarter view
SMALL_FACE_CLIP = DATA / "video/emedinac__LatentSync/demo2_video.mp4"  # HEVC 1080x1920, face ~12% of height
TWO_PEOPLE_CLIP = DATA / "video/facebookresearch__VisualVoice/interview.mp4"
SILENT_CLIP = DATA / "video_silent/tanshuai0219__EDTalk/mouth_source.mp4"  # no audio track
PORTRAIT = DATA / "faces/ageitgey__face_recognition/obama.jpg"
GROUP_PHOTO = DATA / "faces/serengil__deepface/selfie-many-people.jpg"
TWO_PEOPLE_PHOTO = DATA / "faces/ageitgey__face_recognition/two_people.jpg"
SPEECH_FLAC = DATA / "speech/resemble-ai__Resemblyzer/19-198-0000.flac"  # LibriSpeech, 16 kHz


def pytest_configure(config):
    if not (DATA / "manifest.csv").exists():
        raise pytest.UsageError(f"the shared data is missing: expected {DATA}/manifest.csv beside the repository")


@pytest.fixture(scope="session")
def tracker():
    from avatar.face.tracker import FaceTracker

    with FaceTracker() as t:
        yield t


@pytest.fixture(scope="session")
def speech_16k():
    from avatar import media

    return media.read_audio(SPEECH_FLAC, 16000)


def random_chunks(rng: np.random.Generator, n: int):
    """Chunk sizes covering n samples, mixed from 1 sample to 10 s."""
    sizes, total = [], 0
    while total < n:
        kind = rng.integers(4)
        size = [1, int(rng.integers(2, 400)), int(rng.integers(400, 20000)), int(rng.integers(20000, 160001))][kind]
        sizes.append(size)
        total += size
    return sizes


def feed_in_chunks(stream, samples: np.ndarray, rng: np.random.Generator):
    """Push `samples` through a streaming object (`push`/`flush`) in random chunks and join what comes out:
    one array, or a tuple of arrays when the stream returns tuples."""
    outputs, start = [], 0
    for size in random_chunks(rng, samples.size):
        outputs.append(stream.push(samples[start : start + size]))
        start += size
    outputs.append(stream.flush())
    if isinstance(outputs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outputs))
    return np.concatenate(outputs)


def psnr(a: np.ndarray, b: np.ndarray, mask=None) -> float:
    from avatar.metrics import masked_psnr

    return masked_psnr(a, b, mask)


TINY_CACHE_CLIPS = ("rizkiarm__LipNet/bbaf2n.mpg", "rizkiarm__LipNet/brbk7n.mpg", "smeetrs__deep_avsr/00001.mp4")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A preprocessing cache of three real talking clips: GRID-A (validation), GRID-B and LRS2-00001 (training)."""
    from training import preprocess

    out = tmp_path_factory.mktemp("tiny_cache")
    code = preprocess.main(["--src", str(DATA), "--out", str(out), "--workers", "1", "--clips", *TINY_CACHE_CLIPS])
    assert code == 0
    from training import speech_features

    assert speech_features.main(["--src", str(DATA), "--cache", str(out), "--variants", "2", "--no-speech-only"]) == 0
    return out
