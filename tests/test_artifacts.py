"""What viewers see: regression tests for the broken mouths a new user found (one per case), each
asserting what a viewer would check on real portraits from ../shared/data."""

import cv2
import numpy as np
import pytest

from avatar import media
from avatar.config import PipelineConfig
from avatar.face import landmarks as lm
from avatar.pipeline import AvatarPipeline
from benchmarks.artifacts import bright_rows, inner_lip_curves, teeth_threshold
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
    lips = lm.mouth_opening(landmarks)
    teeth_luma = teeth_threshold(portrait, landmarks[lm.MOUTH_AND_JAW, :2])
    photo = bright_rows(portrait, still_upper, still_lower, teeth_luma)
    assert photo > 4  # the photo shows teeth
    out, mouth = opened(pipeline, portrait, landmarks, 0.5)  # from the rest mouth (closed by the prior)
    upper, lower = inner_lip_curves(mouth)
    assert lm.inner_gap(mouth) > 2 * lips
    rendered = bright_rows(out, upper, lower, teeth_luma)
    assert abs(rendered - photo) < 0.3 * photo, (rendered, photo)


def test_lips_that_meet_over_teeth_show_no_teeth_between_them(pipeline, tracker):
    """The smiling portrait with its teeth showing, asked for lips that all but meet (inner gap 2.3
    and 2.7 % of the mouth's width): the lips close, the re-detected opening stays under 1.5 % of the
    inter-ocular distance (measured 0.2 and 0.8; before, the teeth squashed into a lip-thin band
    between them: 2.7 and 4.6) and no teeth show within 3 px of the lips' inner edges."""
    portrait = media.read_image(PORTRAIT)
    landmarks = tracker.select(portrait).landmarks
    still_upper, still_lower = inner_lip_curves(landmarks[lm.MOUTH_AND_JAW, :2])
    teeth_luma = teeth_threshold(portrait, landmarks[lm.MOUTH_AND_JAW, :2])
    assert bright_rows(portrait, still_upper, still_lower, teeth_luma) > 4  # the photo shows teeth
    for amount in (-0.01, -0.005):  # the rest mouth's lower lip raised towards the upper
        out, mouth = opened(pipeline, portrait, landmarks, amount)
        assert 0.02 < lm.inner_gap_ratio(mouth) < 0.03
        detected = tracker.select(out).landmarks
        assert lm.mouth_opening(detected) / lm.interocular(detected) < 0.015, amount
        upper, lower = inner_lip_curves(mouth)
        assert bright_rows(out, upper - [0, 3], lower + [0, 3], teeth_luma) < 0.15, amount


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


def test_a_closed_mouth_portrait_opens_over_teeth_not_a_dark_slot(pipeline, tracker):
    """The closed-mouth painting asked to open: the inside of its mouth shows teeth (borrowed from
    the bundled bank): brighter than the photo's lips' 95th percentile, over at least a third of the
    opening's height in the mouth's middle (measured 12.5 of 15 px at 0.2 mouth widths, 13 of 23 at
    0.3; before: a flat dark slot, 0)."""
    portrait = media.read_image(CLOSED_MOUTH)
    landmarks = tracker.select(portrait).landmarks
    lips = np.zeros(portrait.shape[:2], np.uint8)
    cv2.fillPoly(lips, [np.round(landmarks[lm.LIPS_OUTER, :2]).astype(np.int32)], 1)
    bright = np.percentile(cv2.cvtColor(portrait, cv2.COLOR_RGB2GRAY)[lips > 0], 95)
    for amount in (0.2, 0.3):
        out, mouth = opened(pipeline, portrait, landmarks, amount)
        upper, lower = inner_lip_curves(mouth)
        assert bright_rows(out, upper, lower, bright) > (lower[:, 1].mean() - upper[:, 1].mean()) / 3


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
    """The bundled bank: 256-scale mouths, each with a dark band inside, lips that lean to red (the
    checks that threw out the moustache the tracker once took for lips) and upper teeth showing."""
    from avatar.render.warp import inner_gap_ratio, mouth_bank
    from training.make_mouth_bank import MAX_DARKEST, MIN_TEETH, darkest_band, lips_lean_red, upper_teeth

    bank = mouth_bank()
    assert len(bank) >= 8
    for entry in bank:
        assert entry.crop_size == 256 and entry.borrowed and inner_gap_ratio(entry.mouth) >= 0.22
        assert darkest_band(entry.crop, entry.mouth) <= MAX_DARKEST and lips_lean_red(entry.crop, entry.mouth)
        assert upper_teeth(entry.crop, entry.mouth) >= MIN_TEETH  # its upper teeth show


def test_the_bank_builder_cuts_training_mouths_from_the_source_frames(tiny_cache, tmp_path):
    """`training.make_mouth_bank` on real clips: only training people, patches cut at 256 from the
    source video (sharper than the cache's 128² crops), each passing the checks."""
    from training import make_mouth_bank

    out = tmp_path / "bank.npz"
    assert make_mouth_bank.main(["--cache", str(tiny_cache), "--data", str(DATA), "--out", str(out), "--min-face-px", "0",
                                  "--min-teeth", "0"]) == 0  # the tiny cache's small 160² faces show no bright teeth
    data = np.load(out)
    assert int(data["crop_size"]) == 256 and 1 <= len(data["patches"]) <= 2
    assert not any("GRID-A" in person for person in data["people"])  # the validation person
    for patch, mouth in zip(data["patches"], data["mouths"]):
        width = np.ptp(mouth[:20, 0])
        assert width > 40  # a mouth at the 256 scale (about 30 px at 128)
        assert make_mouth_bank.darkest_band(patch, mouth) <= make_mouth_bank.MAX_DARKEST


@pytest.fixture(scope="module")
def dubbed(pipeline):
    """Jobs and finished regions of the first 12 frames of a real GRID clip dubbed with other speech."""
    from avatar.face.video import align_video
    from avatar.render.base import FrameJob, RenderBatch
    from conftest import GRID_CLIP, SPEECH_FLAC

    tracked = [t for t in align_video(list(media.iter_video_frames(GRID_CLIP))[:12]) if t.valid]
    crop_landmarks = np.stack([t.aligned.landmarks for t in tracked])
    widest = int(np.argmax(lm.mouth_opening(crop_landmarks)))
    identity = pipeline.prepare_frames([], crop_landmarks, [], inner=pipeline.open_mouth(
        tracked[widest].image, tracked[widest].aligned.transform, tracked[widest].aligned.landmarks))
    mouths = pipeline.motion.from_audio(media.read_audio(SPEECH_FLAC)[:16000], 25.0, identity.rest, len(tracked))
    jobs = [FrameJob(t.image, t.aligned.transform, t.aligned.landmarks, t.frame_landmarks,
                     mouths[i] + (lm.mouth_anchor(t.aligned.landmarks) - identity.rest_anchor)) for i, t in enumerate(tracked)]
    return jobs, identity, pipeline.renderer.render(RenderBatch(jobs, [identity] * len(jobs), range(len(jobs))))


def test_the_artifact_check_passes_clean_frames_and_flags_corrupted_ones(pipeline, dubbed):
    """Clean dubbed frames pass; a pasted patch (another part of the frame over the mouth), a smear
    and a repaint reaching far below the face are each flagged, for what they are."""
    import dataclasses

    jobs, _, regions = dubbed
    assert all(pipeline.review(job, region).ok for job, region in zip(jobs, regions))
    job, region = jobs[5], regions[5]
    core = region.alpha > 0.5
    ys, xs = np.nonzero(core)
    patch = dataclasses.replace(region, pixels=region.pixels.copy())
    h, w = (ys.max() - ys.min()) // 2, (xs.max() - xs.min()) // 2
    y0, x0 = ys.min() + h // 2, xs.min() + w // 2
    patch.pixels[y0:y0 + h, x0:x0 + w] = job.frame[:h, :w]  # the frame's corner (background) pasted over the mouth
    assert "colour" in str(pipeline.review(job, patch))
    smear = dataclasses.replace(region, pixels=np.where(core[..., None], cv2.GaussianBlur(region.pixels, (0, 0), 4), region.pixels))
    assert "smeared" in str(pipeline.review(job, smear))
    height = int(np.ptp(job.frame_landmarks[lm.FACE_OVAL, 1]))
    below = np.zeros_like(region.alpha)
    below[height // 2:] = region.alpha[:-(height // 2)]  # the same repaint, half a face lower
    assert "outside the face" in str(pipeline.review(job, dataclasses.replace(region, alpha=np.maximum(region.alpha, below))))


class CorruptingRenderer:
    """A renderer that breaks one frame: the warp renderer's regions with frame `broken`'s repaint
    replaced by a flat grey patch (as a failed model might paint)."""

    def __init__(self, renderer, broken: int):
        self.renderer, self.broken = renderer, broken
        self.name, self.model_files, self.references = renderer.name, renderer.model_files, renderer.references

    def render(self, batch):
        regions = self.renderer.render(batch)
        for k, index in enumerate(batch.frame_indices):
            if index == self.broken and regions[k] is not None:
                regions[k].pixels = np.where(regions[k].alpha[..., None] > 0.1, np.uint8(128), regions[k].pixels)
        return regions

    def warm_up(self, batch):
        self.renderer.warm_up(batch)


def test_a_frame_that_fails_the_check_shows_its_input_and_is_reported(tmp_path):
    """End to end through `dub`: the broken frame is the source frame unchanged, the report lists it
    with its time and why, and the check's cost per frame is recorded."""
    from conftest import GRID_CLIP, SPEECH_FLAC

    pipeline = AvatarPipeline.from_pretrained(config=PipelineConfig(watermark=False, drift=False, batch=4))
    pipeline.renderer = CorruptingRenderer(pipeline.renderer, broken=6)
    clip = media.read_video(GRID_CLIP, max_frames=15)
    media.write_video(tmp_path / "clip.mp4", clip.frames, clip.fps, clip.audio[:9600], crf=12)
    media.write_audio(tmp_path / "speech.wav", media.read_audio(SPEECH_FLAC)[:9600])
    result = pipeline.dub(tmp_path / "clip.mp4", tmp_path / "speech.wav", tmp_path / "out.mp4", progress=False)
    failed = result.report["artifacts"]["frames"]
    assert [item["frame"] for item in failed] == [6] and failed[0]["t"] == pytest.approx(6 / clip.fps)
    assert "colour" in failed[0]["why"] or "smeared" in failed[0]["why"]
    assert 0 < result.report["artifacts"]["ms_per_frame"] < 50
    source = media.read_video(tmp_path / "clip.mp4").frames
    out = media.read_video(tmp_path / "out.mp4").frames

    def worst_block(k: int) -> float:  # the largest mean difference from the source in a 16x8 block: where the mouth was drawn
        error = np.abs(out[k].astype(int) - source[k]).mean(-1)
        h, w = error.shape[0] // 16 * 16, error.shape[1] // 8 * 8
        return float(error[:h, :w].reshape(h // 16, 16, w // 8, 8).mean(axis=(1, 3)).max())

    # the frame as it came (only the encoder's noise: 5.4 levels at worst here), its rendered neighbours 9.2-9.3
    assert worst_block(6) < 0.8 * min(worst_block(5), worst_block(7)), [worst_block(k) for k in (5, 6, 7)]


def test_eval_runs_the_same_check_on_any_pair_of_videos(tmp_path):
    """`avatar eval` lists the frames of a video that fail the check against the real one: a copy of
    a real clip with a flat patch painted over the chin of frames 10-12 fails there and nowhere else."""
    from avatar.evaluate import evaluate_pair
    from conftest import GRID_CLIP

    clip = media.read_video(GRID_CLIP, max_frames=25)
    frames = [frame.copy() for frame in clip.frames]
    with __import__("avatar.face.tracker", fromlist=["FaceTracker"]).FaceTracker() as tracker:
        for i in (10, 11, 12):
            points = tracker.select(frames[i]).landmarks
            chin = points[lm.JAW[6:13], :2].astype(np.int32)  # the chin's part of the jaw line
            lips = points[lm.LIPS_OUTER, :2]
            cv2.fillPoly(frames[i], [np.concatenate([chin, lips[[15]].astype(np.int32)])], (150, 150, 150))
    media.write_video(tmp_path / "patched.mp4", frames, clip.fps, crf=12)
    media.write_video(tmp_path / "real.mp4", clip.frames, clip.fps, crf=12)
    result = evaluate_pair(tmp_path / "patched.mp4", tmp_path / "real.mp4")
    assert [item["frame"] for item in result["artifact_frames"]] == [10, 11, 12], result["artifact_frames"]


@pytest.mark.parametrize("clip", ["sstzal__DFRF/cnn2_25fps.mp4", "Hangz-nju-cuhk__Talking-Face_PC-AVS/00015.mp4"])
def test_a_portrait_with_an_open_mouth_rests_closed_in_silence(pipeline, tracker, clip):
    """The widest-open frame of a validation speaker's clip, as a portrait, animated with silence: the
    closed-mouth prior gives the rest, so the re-detected gap comes back at least 80% of the way to
    the speaker's own closed mouth (the clip's most-closed tenth) and ends within 11% of the mouth's
    width of it (before: the mouth stayed as wide open as the photo). Measured 2026-12-01: CNN −1.8%,
    PC-AVS 00015 (open 0.55 IOD in the photo) 10.0%, 8.8% before the warp read its spline's grid where
    it should: the closed lips' seam, drawn from the open mouth's dark inner edge, is a pixel wider."""
    from avatar.config import IdleConfig
    from avatar.face.video import align_video

    tracked = [t for t in align_video(list(media.iter_video_frames(DATA / "video" / clip))[:125]) if t.valid]
    points = np.stack([t.frame_landmarks for t in tracked])
    gaps = lm.mouth_opening(points) / lm.interocular(points)
    widest, closed = int(np.argmax(gaps)), float(np.percentile(gaps, 10))
    portrait = tracked[widest].image
    landmarks = tracker.select(portrait).landmarks
    identity = pipeline.prepare_image(portrait, landmarks)
    assert identity.rest_inferred
    still = list(pipeline.animate_frames(identity, portrait, landmarks, np.zeros(16000, np.float32), IdleConfig(enabled=False)))[-1]
    detected = tracker.select(still).landmarks
    gap = lm.mouth_opening(detected) / lm.interocular(detected)
    assert (gaps[widest] - gap) >= 0.8 * (gaps[widest] - closed), (gaps[widest], gap, closed)
    width = lm.mouth_width(detected[lm.MOUTH_AND_JAW, :2]) / lm.interocular(detected)
    assert gap - closed < 0.11 * width, (gap, closed, width)


def test_a_closed_mouth_portrait_keeps_its_closed_lips_in_near_silence(pipeline, tracker):
    """The closed-mouth painting animated with room noise (-55 dBFS white noise, -45 dBFS hum): every
    frame's re-detected gap stays within 10% of the mouth's width of the photo's, and no dark slit
    opens between the lips (the darkest tenth of the lips' middle stays within 12 levels of the
    photo's; a 2-px dark line drawn between them lowers it by 22). Reported on unseen photos before;
    not reproduced on this portrait with the code of the time either: kept as a guard."""
    from avatar.config import IdleConfig

    portrait = media.read_image(CLOSED_MOUTH)
    landmarks = tracker.select(portrait).landmarks

    def lips_middle(image, points):
        """Luma of the band between the outer lips' middle third."""
        lips = points[lm.LIPS_OUTER, :2]
        left, right = lips[:, 0].min(), lips[:, 0].max()
        mask = np.zeros(image.shape[:2], np.uint8)
        cv2.fillPoly(mask, [np.round(lips).astype(np.int32)], 1)
        mask[:, :int(left + (right - left) / 3)] = 0
        mask[:, int(right - (right - left) / 3):] = 0
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[mask > 0]

    photo_gap = float(lm.mouth_opening(landmarks) / lm.interocular(landmarks))
    photo_dark = np.percentile(lips_middle(portrait, landmarks), 10)
    rng = np.random.default_rng(0)
    for noise in (rng.normal(0, 10 ** (-55 / 20), 32000), 10 ** (-45 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 50 * np.arange(32000) / 16000)):
        identity = pipeline.prepare_image(portrait, landmarks)
        frames = list(pipeline.animate_frames(identity, portrait, landmarks, noise.astype(np.float32), IdleConfig(enabled=False)))
        for frame in frames[::5]:
            detected = tracker.select(frame).landmarks
            gap = float(lm.mouth_opening(detected) / lm.interocular(detected))
            width = lm.mouth_width(detected[lm.MOUTH_AND_JAW, :2]) / lm.interocular(detected)
            assert abs(gap - photo_gap) < 0.1 * width, (gap, photo_gap, width)
            assert np.percentile(lips_middle(frame, detected), 10) > photo_dark - 12, (np.percentile(lips_middle(frame, detected), 10), photo_dark)


def test_the_closed_mouth_prior_closes_held_out_mouths_better_than_the_baselines(tiny_cache):
    """Fitted on the training people of real clips and measured on the validation person: closer to
    the person's real closed mouth than the open mouth as it is and than lifting the lower lip by the gap."""
    from training import fit_closed_mouth as fcm

    opened, closed, people = fcm.pairs(tiny_cache, "train")
    v_open, v_closed, _ = fcm.pairs(tiny_cache, "val")
    assert len(set(people)) >= 1 and len(v_open) > 0
    model = fcm.fit(opened, closed, 0.01)
    prior = fcm.error(fcm.predict(model, v_open), v_closed)
    assert prior < fcm.error(v_open, v_closed) and prior < fcm.error(fcm.lift(v_open), v_closed), prior


TURNED_CLIP = DATA / "video/Hangz-nju-cuhk__Talking-Face_PC-AVS/00002.mp4"  # turns up to 55° from frontal


def test_a_face_turned_beyond_the_pose_limit_passes_through_and_is_reported(tmp_path):
    """Dub of a real clip whose speaker turns towards profile: frames turned more than 45° are the
    source frames unchanged and listed ("pose"), the others are repainted; a portrait turned that far
    is refused with one line."""
    import subprocess
    import sys

    from avatar.face.video import align_video
    from conftest import REPO, SPEECH_FLAC

    clip = media.read_video(TURNED_CLIP, max_frames=40)
    media.write_video(tmp_path / "clip.mp4", clip.frames, clip.fps, clip.audio[:int(40 / clip.fps * 16000)], crf=12)
    media.write_audio(tmp_path / "speech.wav", media.read_audio(SPEECH_FLAC)[:int(40 / clip.fps * 16000)])
    source = media.read_video(tmp_path / "clip.mp4").frames
    yaw = np.array([abs(lm.yaw_degrees(t.frame_landmarks)) if t.valid else 0.0
                    for t in align_video(media.iter_video_frames(tmp_path / "clip.mp4"))])
    assert (yaw > 45).sum() >= 3 and (yaw <= 45).sum() >= 3
    pipeline = AvatarPipeline.from_pretrained(config=PipelineConfig(drift=False))
    result = pipeline.dub(tmp_path / "clip.mp4", tmp_path / "speech.wav", tmp_path / "out.mp4", progress=False)
    posed = [item["frame"] for item in result.report["artifacts"]["frames"] if item["why"].startswith("pose")]
    assert posed == [int(i) for i in np.flatnonzero(yaw > 45)]
    out = media.read_video(tmp_path / "out.mp4").frames
    turned, frontal = int(np.argmax(yaw)), int(np.argmin(np.where(yaw > 0, yaw, 99)))
    assert np.abs(out[turned].astype(int) - source[turned]).mean() < np.abs(out[frontal].astype(int) - source[frontal]).mean()
    cv2.imwrite(str(tmp_path / "turned.png"), cv2.cvtColor(source[turned], cv2.COLOR_RGB2BGR))
    refused = subprocess.run([sys.executable, "-m", "avatar.cli", "animate", "--image", str(tmp_path / "turned.png"), "--audio",
                              str(tmp_path / "speech.wav"), "--output", str(tmp_path / "a.mp4"), "--quiet"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "turned" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "a.mp4").exists()


def test_a_three_quarter_view_within_the_limit_is_repainted_inside_its_face(pipeline, tracker):
    """A frame of the turning PC-AVS clip at about 40° (within the 45° limit), as a portrait, opened
    step by step: each frame passes the artifact check and every repainted pixel lies inside the
    face's outline (reported before on an unseen 3/4 photo: a second mouth-like blob and pale smears
    on the far cheek; on this frame the code of the time showed neither: kept as a guard)."""
    from avatar.face.video import align_video

    tracked = [t for t in align_video(media.iter_video_frames(TURNED_CLIP)) if t.valid]
    yaw = np.array([abs(float(lm.yaw_degrees(t.frame_landmarks))) for t in tracked])
    portrait = tracked[int(np.argmin(np.abs(yaw - 40)))].image
    landmarks = tracker.select(portrait).landmarks
    assert 35 < abs(float(lm.yaw_degrees(landmarks))) <= 45
    identity = pipeline.prepare_image(portrait, landmarks)
    for amount in (0.1, 0.3):
        mouth = identity.rest.copy()
        mouth[LOWER, 1] += amount * np.ptp(identity.rest[:20, 0])
        job = pipeline.still_job(identity, portrait, landmarks, mouth)
        failed = []
        out = pipeline.render_batch([job], [identity], [0], failed)[0]
        assert failed == [] and not np.array_equal(out, portrait)
        changed = np.abs(out.astype(int) - portrait).max(axis=2) > 0
        hull = pipeline.aligner.face_hull(job.crop_landmarks, lm.with_mouth(job.crop_landmarks, job.mouth))
        inside = pipeline.aligner.paste_alpha(portrait.shape, job.transform, (hull > 0).astype(np.float32)) > 0
        assert not (changed & ~inside).any()


def test_a_small_face_still_shows_its_mouth_move(pipeline, tracker):
    """A tight 160×160 crop of a validation speaker (the face about 100 px high), animated with real
    speech: the re-detected mouth opening moves over at least 0.07 inter-ocular distances (at 512 px:
    about 0.13) and follows the asked one nearly as well as the same portrait scaled to 512 px does
    (r within 0.1 of it; how well any size follows depends on the speech's trajectory: the 4-block
    encoder's models gave 0.92 small / 0.93 large, the 2-block ones 0.78 / 0.82), which must follow
    it (r ≥ 0.7)."""
    import cv2

    from avatar.config import IdleConfig

    small = media.read_video(DATA / "video/smeetrs__deep_avsr/00006.mp4", max_frames=6, with_audio=False).frames[5]
    assert small.shape[:2] == (160, 160)
    speech = media.read_audio(DATA / "video/OpenTalker__SadTalker/WDA_KatieHill_000.mp4")[16000:16000 * 4]

    def followed(portrait):
        landmarks = tracker.select(portrait).landmarks
        identity = pipeline.prepare_image(portrait, landmarks)
        frames = list(pipeline.animate_frames(identity, portrait, landmarks, speech, IdleConfig(enabled=False)))
        mouths = pipeline.motion.from_audio(speech, 25.0, identity.rest, len(frames))
        job = pipeline.still_job(identity, portrait, landmarks, mouths[0])
        asked = lm.inner_gap(mouths[::3]) / lm.interocular(job.crop_landmarks)
        seen = []
        for frame in frames[::3]:
            detected = tracker.select(frame).landmarks
            seen.append(lm.mouth_opening(detected) / lm.interocular(detected))
        return float(np.ptp(seen)), float(np.corrcoef(seen, asked)[0, 1])

    small_range, small_r = followed(small)
    large_range, large_r = followed(cv2.resize(small, (512, 512), interpolation=cv2.INTER_CUBIC))
    assert small_range >= 0.07 and large_r >= 0.7 and small_r >= large_r - 0.1, (small_range, small_r, large_range, large_r)


def test_a_rolled_head_is_rendered_inside_its_face(tmp_path):
    """A real GRID clip turned 35° in the picture plane (a head tilted onto the shoulder): the
    alignment follows the roll, so every frame is repainted (none fails the check) and every
    repainted pixel lies inside the face's outline as it is or as it will be."""
    from avatar.face.video import align_video
    from avatar.render.base import FrameJob
    from conftest import GRID_CLIP, SPEECH_FLAC

    clip = media.read_video(GRID_CLIP, max_frames=12)
    h, w = clip.frames[0].shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), 35, 0.8)
    frames = [cv2.warpAffine(f, turn, (w, h), borderMode=cv2.BORDER_REFLECT) for f in clip.frames]
    pipeline = AvatarPipeline.from_pretrained(config=PipelineConfig(watermark=False, workers=1))
    tracked = [t for t in align_video(((i / clip.fps, f) for i, f in enumerate(frames))) if t.valid]
    assert len(tracked) == 12
    crop_landmarks = np.stack([t.aligned.landmarks for t in tracked])
    identity = pipeline.prepare_frames([], crop_landmarks, [])
    mouths = pipeline.motion.from_audio(media.read_audio(SPEECH_FLAC)[:16000], 25.0, identity.rest, len(tracked))
    jobs = [FrameJob(t.image, t.aligned.transform, t.aligned.landmarks, t.frame_landmarks,
                     mouths[i] + (lm.mouth_anchor(t.aligned.landmarks) - identity.rest_anchor)) for i, t in enumerate(tracked)]
    failed = []
    outputs = pipeline.render_batch(jobs, [identity] * len(jobs), range(len(jobs)), failed)
    assert failed == []
    for job, out in zip(jobs, outputs):
        changed = np.abs(out.astype(int) - job.frame).max(axis=2) > 0
        target = lm.with_mouth(job.crop_landmarks, job.mouth)
        hull = pipeline.aligner.face_hull(job.crop_landmarks, target)
        inside = pipeline.aligner.paste_alpha(job.frame.shape, job.transform, (hull > 0).astype(np.float32)) > 0
        assert changed.any() and not (changed & ~inside).any()


TILTED_CLIP = DATA / "video_silent/FuxiVirtualHuman__styletalk/furious_talk2_clip7.mp4"  # head tilts down 30° and rolls, fast


def test_the_mouth_is_placed_at_each_frames_head_pose():
    """A real clip whose head turns, tilts and rolls: the rest mouth turned with the head
    (`avatar.motion.pose`) lands on each frame's own jaw near the ears, where speech moves it little
    (mean under 1.5 px at 128², measured 0.7), where moving the rest mouth by the mouth anchor alone
    missed by 3.9 px; a known 3D similarity is recovered exactly; `offsets_of` undoes `place`."""
    from avatar.face.video import align_video
    from avatar.motion.pose import PosedRest, similarity_3d
    from avatar.motion.runner import closed_frames, rest_pose

    rng = np.random.default_rng(0)
    points = rng.normal(0, 30, (20, 3))
    angle = 0.4
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    scale, found, shift = similarity_3d(points, 1.3 * points @ rotation.T + [5, -2, 7])
    np.testing.assert_allclose([scale, *found.ravel(), *shift], [1.3, *rotation.ravel(), 5, -2, 7], atol=1e-9)

    faces = np.stack([t.aligned.landmarks for t in align_video(media.iter_video_frames(TILTED_CLIP)) if t.valid]).astype(np.float64)
    assert len(faces) >= 80
    rest, anchor = rest_pose(faces)
    posed = PosedRest.from_frames(faces, rest, closed_frames(faces[..., :2]))
    near_ears = lm.JAW[[0, 1, 2, -3, -2, -1]]
    by_anchor = [np.abs(rest[40:][[0, 1, 2, -3, -2, -1]] + lm.mouth_anchor(f) - anchor - f[near_ears, :2]).mean() for f in faces]
    by_pose = [np.abs(posed.place(f, rest)[40:][[0, 1, 2, -3, -2, -1]] - f[near_ears, :2]).mean() for f in faces]
    assert np.mean(by_pose) < 1.5 and np.mean(by_anchor) > 2 * np.mean(by_pose), (np.mean(by_pose), np.mean(by_anchor))
    # and back: a frame's own mouth as offsets in the head (`offsets_of`, what the adaptation is fitted
    # on) placed again lands on it (measured 0.11 px mean, 0.45 the worst: the offsets keep no depth)
    back = [np.abs(posed.place(f, rest + posed.offsets_of(f)) - f[lm.MOUTH_AND_JAW, :2]).mean() for f in faces]
    assert np.mean(back) < 0.2 and np.max(back) < 0.75, (np.mean(back), np.max(back))


def test_a_head_tilting_and_rolling_fast_keeps_its_jaw(tmp_path):
    """Dub of that clip ("melting face": with the mouth placed by its anchor alone, the jaw was drawn
    well inside the face and the warp dragged neck and collar colours up over the chin; 31 of 59
    frames failed the artifact check, for new colours in the repainted skin, and showed their input).
    Now the frames pass the check and are repainted."""
    from conftest import SPEECH_FLAC

    media.write_audio(tmp_path / "speech.wav", media.read_audio(SPEECH_FLAC)[:32000])
    pipeline = AvatarPipeline.from_pretrained(config=PipelineConfig(drift=False, watermark=False))
    result = pipeline.dub(TILTED_CLIP, tmp_path / "speech.wav", tmp_path / "out.mp4", progress=False)
    failed = result.report["artifacts"]["frames"]
    assert len(failed) <= 3, failed
    source = media.read_video(TILTED_CLIP, with_audio=False).frames
    out = media.read_video(tmp_path / "out.mp4").frames
    assert np.mean([np.abs(o.astype(int) - s).max() > 40 for o, s in zip(out, source)]) > 0.9  # repainted, not passed through


def test_the_source_leak_measure_holds_the_real_mouth_fixed():
    """benchmarks.sync's source leak: a dub that correlates with the picture it was drawn on only as
    much as the real mouth does scores 0; one whose picture's mouth shows through scores above it."""
    from benchmarks.sync import source_leak

    rng = np.random.default_rng(0)
    real, picture = rng.normal(size=2000), rng.normal(size=2000)
    picture = 0.5 * real + picture  # the reversed clip correlates with the real one by chance
    faithful = real + 0.5 * rng.normal(size=2000)
    leaky = faithful + 0.6 * picture
    faithful[:50] = np.nan  # frames without a face are left out
    assert abs(source_leak(faithful, picture, real)) < 0.06
    assert source_leak(leaky, picture, real) > 0.3


def test_the_closure_counts_tell_a_mouth_that_closes_from_one_that_never_does():
    """benchmarks.sync's closures: a dub that copies the real openings closes every closed frame and
    no open one; a mouth held ajar closes none; frames without a face in either are not counted."""
    from benchmarks.sync import closures

    rng = np.random.default_rng(2)
    real = np.abs(rng.normal(0.06, 0.05, 300))
    real[::5] = 0.005
    real[7] = np.nan
    faithful, ajar = closures(real.copy(), real), closures(np.full(300, 0.03), real)
    closed, wide = int((real[np.isfinite(real)] < 0.02).sum()), int((real[np.isfinite(real)] > 0.06).sum())
    assert faithful.tolist() == [closed, closed, wide, 0] and ajar.tolist() == [closed, 0, wide, 0]


def test_the_fidelity_figures_tell_a_faithful_renderer_from_one_that_keeps_the_picture():
    """benchmarks.fidelity's figures on synthetic openings: drawing what was asked gives r 1, weight
    1 on the asked opening and 0 on the picture's own, and closed frames as the real ones; keeping
    the picture's own mouth gives the weights the other way round and the closed frames open."""
    from benchmarks.fidelity import measure

    rng = np.random.default_rng(1)
    real = np.abs(rng.normal(0.06, 0.05, 500))
    real[::7] = 0.005  # closed frames
    picture = np.abs(rng.normal(0.06, 0.05, 500)) + 0.03
    faithful, kept = measure(real.copy(), picture, real), measure(picture.copy(), picture, real)
    assert faithful["r"] > 0.999 and abs(faithful["asked"] - 1) < 1e-6 and abs(faithful["own"]) < 1e-6
    assert abs(faithful["closed_drawn"] - faithful["closed_real"]) < 1e-9
    assert abs(kept["asked"]) < 1e-6 and abs(kept["own"] - 1) < 1e-6 and kept["leak"] > 0.9
    assert kept["closed_drawn"] > 0.05
    frames, asked, drawn = faithful["response"]  # per bin of the real opening: the drawn mean equals the real one
    assert frames.sum() == 500 and np.allclose(asked, drawn)
    frames, asked, drawn = kept["response"]  # the closed bin drawn open
    assert frames[0] > 0 and drawn[0] / frames[0] > 0.05 > asked[0] / frames[0]


def test_the_inside_jumps_count_only_frames_open_on_both_sides_and_show_a_pop():
    """benchmarks.fidelity's inside jumps: the change of the inside's grey level between consecutive
    frames open in both (> OPEN) with a face; a steady inside that flips from dark to teeth once
    shows one large jump, a closed frame or a missing face between ends a pair."""
    from benchmarks.fidelity import inside_jumps
    from benchmarks.sync import OPEN

    openings = np.full(10, 2 * OPEN)
    openings[4] = OPEN / 2  # closed: no pair with frame 4
    inside = np.array([40.0, 41, 42, 43, 200, 150, 151, 152, np.nan, 152])
    jumps = inside_jumps(openings, inside)
    assert jumps.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    inside[4], openings[4] = 43.0, 2 * OPEN
    assert sorted(inside_jumps(openings, inside).tolist()) == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 107.0]
