"""What viewers see: regression tests for the broken mouths a new user found (one per case), each
asserting what a viewer would check on real portraits from ../shared/data."""

import cv2
import numpy as np
import pytest

from avatar import media
from avatar.config import PipelineConfig
from avatar.face import landmarks as lm
from avatar.pipeline import AvatarPipeline
from benchmarks.artifacts import bright_rows, inner_lip_curves
from conftest import DATA, PORTRAIT

CLOSED_MOUTH = DATA / "faces/OpenTalker__SadTalker/art_1.png"
LOWER = np.r_[np.arange(11, 20), np.arange(31, 40), np.arange(40, 59)]  # lower lips and the jaw, in MOUTH_AND_JAW


@pytest.fixture(scope="module")
def pipeline():
    return AvatarPipeline.from_pretrained(config=PipelineConfig(watermark=False, workers=1))


def opened(pipeline, portrait, landmarks, amount):
    """The portrait rendered with its lower lip and jaw dropped by `amount` mouth widths, and the
    target mouth in frame pixels."""
    identity = pipeline.prepare_image(portrait, landmarks)
    mouth = identity.rest.copy()
    mouth[LOWER, 1] += amount * np.ptp(identity.rest[:20, 0])
    job = pipeline.still_job(identity, portrait, landmarks, mouth)
    frame_mouth = cv2.transform(job.mouth[None].astype(np.float64), cv2.invertAffineTransform(job.transform))[0]
    return pipeline.render_batch([job], [identity], [0])[0], frame_mouth


def test_teeth_keep_their_height_when_the_mouth_opens(pipeline, tracker):
    """A smiling portrait showing its teeth, asked to open: the upper teeth hang from the upper lip
    with their own height (before: stretched into vertical streaks over the whole opening). Bound:
    within 30% of the photo's teeth height, while the opening itself more than doubles."""
    portrait = media.read_image(PORTRAIT)
    landmarks = tracker.select(portrait).landmarks
    still_upper, still_lower = inner_lip_curves(landmarks[lm.MOUTH_AND_JAW, :2])
    interior = cv2.cvtColor(portrait, cv2.COLOR_RGB2GRAY)[int(still_upper[:, 1].min()):int(still_lower[:, 1].max()),
                                                           int(still_upper[0, 0]):int(still_upper[-1, 0])]
    lips = lm.mouth_opening(landmarks)
    teeth_luma = 0.5 * (np.percentile(interior, 90) + np.percentile(interior, 10))
    photo = bright_rows(portrait, still_upper, still_lower, teeth_luma)
    assert photo > 4  # the photo shows teeth
    out, mouth = opened(pipeline, portrait, landmarks, 0.3)
    upper, lower = inner_lip_curves(mouth)
    assert lm.inner_gap(mouth) > 2 * lips
    rendered = bright_rows(out, upper, lower, teeth_luma)
    assert abs(rendered - photo) < 0.3 * photo, (rendered, photo)


@pytest.mark.parametrize("path", [PORTRAIT, CLOSED_MOUTH], ids=["own-teeth", "borrowed-mouth"])
def test_a_grey_photo_gets_a_grey_mouth(pipeline, tracker, path):
    """Grey in, grey out: the inside of the opened mouth, the person's own or borrowed from the
    bundled bank, has no hue the photo does not have (before: cyan with red corners)."""
    portrait = np.repeat(cv2.cvtColor(media.read_image(path), cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    landmarks = tracker.select(portrait).landmarks
    for amount in (0.15, 0.35):
        out, _ = opened(pipeline, portrait, landmarks, amount)
        assert not np.array_equal(out, portrait)
        spread = out.astype(np.int16).max(axis=2) - out.astype(np.int16).min(axis=2)
        assert spread.max() <= 2, (amount, spread.max())


def test_a_borrowed_mouth_takes_the_photos_colours():
    """The lighting match of another person's mouth: lightness follows the lips' ratio, chroma the
    photo's (none for grey lips), and it never swaps hues."""
    from avatar.render.warp import match_lighting

    mouth = np.array([[[200, 60, 70], [240, 235, 225], [40, 10, 15]]], np.float32)  # red lip, tooth, cavity
    grey = match_lighting(mouth, np.array([120, 120, 120.0]), np.array([180, 70, 80.0]))
    assert np.abs(grey - grey.mean(axis=-1, keepdims=True)).max() < 1.5
    warm = match_lighting(mouth, np.array([170, 90, 80.0]), np.array([180, 70, 80.0]))
    assert warm[0, 0, 0] > warm[0, 0, 1] and warm[0, 0, 0] > warm[0, 0, 2]  # a red lip stays red
    assert abs(warm[0, 1] - mouth[0, 1]).max() < 25  # a tooth stays a tooth


def test_every_shipped_bank_mouth_is_an_open_mouth_at_256():
    """The bundled bank: 256-scale mouths, each with a dark band inside and lips that lean to red (the
    checks that threw out the moustache the tracker once took for lips)."""
    from avatar.render.warp import inner_gap_ratio, mouth_bank
    from training.make_mouth_bank import MAX_DARKEST, darkest_band, lips_lean_red

    bank = mouth_bank()
    assert len(bank) >= 8
    for entry in bank:
        assert entry.crop_size == 256 and entry.borrowed and inner_gap_ratio(entry.mouth) >= 0.22
        assert darkest_band(entry.crop, entry.mouth) <= MAX_DARKEST and lips_lean_red(entry.crop, entry.mouth)


def test_the_bank_builder_cuts_training_mouths_from_the_source_frames(tiny_cache, tmp_path):
    """`training.make_mouth_bank` on real clips: only training people, patches cut at 256 from the
    source video (sharper than the cache's 128² crops), each passing the checks."""
    from training import make_mouth_bank

    out = tmp_path / "bank.npz"
    assert make_mouth_bank.main(["--cache", str(tiny_cache), "--data", str(DATA), "--out", str(out), "--min-face-px", "0"]) == 0
    data = np.load(out)
    assert int(data["crop_size"]) == 256 and 1 <= len(data["patches"]) <= 2
    assert not any("GRID-A" in person for person in data["people"])  # the validation person
    for patch, mouth in zip(data["patches"], data["mouths"]):
        width = np.ptp(mouth[:20, 0])
        assert width > 40  # a mouth at the 256 scale (about 30 px at 128)
        assert make_mouth_bank.darkest_band(patch, mouth) <= make_mouth_bank.MAX_DARKEST
