"""The `avatar` command on real media: the front-end view, and one-line errors for bad input."""

import subprocess
import sys

import numpy as np
import pytest

from avatar import media
from conftest import DATA, LRS2_CLIP, PORTRAIT, REPO, SILENT_CLIP, TWO_PEOPLE_PHOTO

SPEECH = DATA / "speech/kleinlee__DH_live/audio0.wav"


def avatar(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "avatar.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_inspect_a_portrait_with_speech(tmp_path):
    out = tmp_path / "view.mp4"
    result = avatar("inspect", "--image", PORTRAIT, "--audio", SPEECH, "--output", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "motion model" in result.stdout and "not rendered here" in result.stdout
    clip = media.read_video(out)
    seconds = media.read_audio(SPEECH).size / 16000
    video_seconds = len(clip.frames) / 25
    assert 0 <= video_seconds - seconds < 1 / 25  # frames cover the speech
    assert abs(clip.audio.size / 16000 - video_seconds) < 1 / 25  # A/V within one frame
    assert clip.frames.shape[1:] == (256, 512, 3)


def test_inspect_a_video_uses_its_own_audio(tmp_path):
    out = tmp_path / "view.mp4"
    result = avatar("inspect", "--video", LRS2_CLIP, "--output", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(media.read_video(out, with_audio=False).frames) == media.probe(LRS2_CLIP).n_frames


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "corrupt.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 40000, dtype=np.uint8).tobytes())
    from skimage import data
    from PIL import Image

    Image.fromarray(data.coffee()).save(folder / "no_face.jpg")
    (folder / "a_file").write_text("not a folder")
    return folder


def bad_cases(folder, out):
    return [
        (["--image", folder / "no_face.jpg", "--audio", SPEECH], "no face"),
        (["--image", TWO_PEOPLE_PHOTO, "--audio", SPEECH], "face-index"),
        (["--image", PORTRAIT, "--audio", folder / "empty.wav"], "empty"),
        (["--image", PORTRAIT, "--audio", folder / "corrupt.mp4"], "cannot be read"),
        (["--video", folder / "corrupt.mp4"], "cannot be read"),
        (["--video", SILENT_CLIP], "no audio track"),
        (["--image", PORTRAIT, "--audio", SILENT_CLIP], "no audio track"),
        (["--image", PORTRAIT], "needs speech"),
    ]


def test_bad_input_gives_one_line_and_no_output(tmp_path, bad_files):
    out = tmp_path / "out.mp4"
    for args, words in bad_cases(bad_files, out):
        result = avatar("inspect", *args, "--output", out, "--quiet")
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert words in result.stderr, result.stderr
        assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_equal_to_input_or_unwritable_is_refused(tmp_path, bad_files):
    audio_copy = tmp_path / "speech.wav"
    audio_copy.write_bytes(SPEECH.read_bytes())
    before = audio_copy.read_bytes()
    result = avatar("inspect", "--image", PORTRAIT, "--audio", audio_copy, "--output", audio_copy, "--quiet")
    assert result.returncode == 2 and "also an input" in result.stderr and result.stderr.count("\n") == 1
    assert audio_copy.read_bytes() == before
    result = avatar("inspect", "--image", PORTRAIT, "--audio", SPEECH, "--output", bad_files / "a_file" / "out.mp4", "--quiet")
    assert result.returncode == 2 and "not a folder" in result.stderr and result.stderr.count("\n") == 1


def test_help_lists_config_options():
    result = avatar("inspect", "--help")
    assert result.returncode == 0
    for option in ("--face.min-face-size", "--face.face-index", "--align.crop-size", "--mel.window-offset", "--vad.margin-db"):
        assert option in result.stdout
