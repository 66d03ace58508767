"""Face front-end on real photos and clips: detection, choice, tracking, jitter, alignment, paste-back."""

import numpy as np
import pytest

from avatar import media
from avatar.config import AlignConfig, FaceConfig
from avatar.errors import FaceTooSmallError, NoFaceError, SeveralFacesError
from avatar.face import landmarks as lm
from avatar.face.align import FaceAligner, apply_transform, rescale_points, rescale_transform
from avatar.face.tracker import FaceTracker
from avatar.face.video import align_video
from conftest import (GRID_CLIP, GROUP_PHOTO, LRS2_CLIP, LRS2_YAW_CLIP, PORTRAIT, SMALL_FACE_CLIP, TWO_PEOPLE_CLIP,
                      TWO_PEOPLE_PHOTO, psnr)


def frames_of(path, n=None):
    for i, item in enumerate(media.iter_video_frames(path)):
        if n is not None and i >= n:
            return
        yield item


def test_portrait_gives_478_landmarks_on_the_face(tracker):
    image = media.read_image(PORTRAIT)
    face = tracker.select(image)
    assert face.landmarks.shape == (478, 3) and face.landmarks.dtype == np.float32
    x0, y0, x1, y1 = face.box
    assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
    eyes = lm.eye_centres(face.landmarks)
    assert eyes[0, 0] < eyes[1, 0]  # subject's right eye on the image's left
    assert face.landmarks[lm.CHIN, 1] > face.landmarks[lm.NOSE_TIP, 1] > eyes[:, 1].max()
    assert abs(float(lm.yaw_degrees(face.landmarks))) < 15


def test_group_photo_needs_a_choice_and_indices_go_left_to_right(tracker):
    image = media.read_image(GROUP_PHOTO)
    faces = tracker.detect(image)
    assert len(faces) >= 3
    centres = [f.centre[0] for f in faces]
    assert centres == sorted(centres)
    with pytest.raises(SeveralFacesError, match="face-index") as info:
        tracker.select(image)
    assert "\n" not in str(info.value)
    for index in (0, len(faces) - 1):
        chosen = FaceTracker(FaceConfig(face_index=index)).select(image)
        assert np.allclose(chosen.centre, faces[index].centre, atol=2)
    with pytest.raises(SeveralFacesError, match="out of range"):
        FaceTracker(FaceConfig(face_index=len(faces))).select(image)


def test_two_people_photo_is_ambiguous(tracker):
    with pytest.raises(SeveralFacesError):
        tracker.select(media.read_image(TWO_PEOPLE_PHOTO))


def test_no_face_and_too_small_face_are_clear_errors(tracker):
    from skimage import data

    with pytest.raises(NoFaceError, match="no face") as info:
        tracker.select(np.ascontiguousarray(data.coffee()), what="coffee.png")  # a real photo of a cup
    assert "coffee.png" in str(info.value)
    import cv2

    image = media.read_image(PORTRAIT)
    tiny = cv2.resize(image, (image.shape[1] // 8, image.shape[0] // 8), interpolation=cv2.INTER_AREA)
    with pytest.raises(FaceTooSmallError, match="minimum is 48 px"):
        FaceTracker(FaceConfig(min_face_size=48)).select(tiny)


def test_still_image_repeated_has_no_jitter():
    image = media.read_image(PORTRAIT)
    frames = list(align_video(((i / 25, image) for i in range(100))))
    assert all(f.valid for f in frames)
    crop_points = np.stack([f.aligned.landmarks[:, :2] for f in frames])
    transforms = np.stack([f.aligned.transform for f in frames])
    assert crop_points.std(axis=0).max() < 0.01  # pixels: nothing but float rounding
    assert transforms.std(axis=0).max() < 1e-6
    crops = np.stack([f.aligned.crop for f in frames])
    assert (crops == crops[0]).all()


def track(path, n=None, config=FaceConfig()):
    return list(align_video(frames_of(path, n), config))


def test_tracks_a_grid_clip_and_the_mouth_moves_with_speech():
    frames = track(GRID_CLIP)
    assert len(frames) == 75 and all(f.valid for f in frames)
    opening = np.array([lm.mouth_opening(f.aligned.landmarks) for f in frames])  # 128-crop pixels
    assert opening[:8].mean() < 1.5  # GRID clips start in silence, mouth closed
    assert opening.max() > 5 and opening.std() > 1.0
    # Alignment holds the face still in the crop: the stable points stay near the template.
    template = FaceAligner().template
    drift = [np.abs(f.aligned.landmarks[lm.STABLE, :2] - template[lm.STABLE]).max() for f in frames]
    assert max(drift) < 4


def test_smoothing_keeps_lip_motion():
    smoothed = track(LRS2_CLIP)
    raw = track(LRS2_CLIP, config=FaceConfig(smooth=False))
    a = np.array([lm.mouth_opening(f.aligned.landmarks) for f in smoothed])
    b = np.array([lm.mouth_opening(f.aligned.landmarks) for f in raw])
    assert np.corrcoef(a, b)[0, 1] > 0.95
    assert abs(a.std() - b.std()) < 0.15 * b.std()  # amplitude kept


def test_tracks_a_small_face_in_a_1080x1920_clip():
    frames = track(SMALL_FACE_CLIP, n=40)
    assert all(f.valid for f in frames)
    heights = [np.ptp(f.frame_landmarks[:, 1]) for f in frames]
    assert 150 < np.median(heights) < 450  # face about 12-20% of 1920 px
    assert frames[0].aligned.crop.shape == (128, 128, 3)


def test_yawed_clip_reports_large_yaw_or_loses_the_face():
    frames = track(LRS2_YAW_CLIP)
    yaws = [abs(float(lm.yaw_degrees(f.aligned.landmarks))) for f in frames if f.valid]
    assert len(yaws) > 10 and np.median(yaws) > 25
    assert any(not f.valid for f in frames) or np.max(yaws) > 40


@pytest.mark.parametrize("path, n", [(LRS2_YAW_CLIP, 86), (SMALL_FACE_CLIP, 75)])
def test_meshing_the_next_frame_ahead_gives_exactly_the_landmarks_of_one_frame_after_the_other(path, n):
    """`mesh_workers` 2 (the default) meshes frame t+1 in frame t's region on a second mesh while frame t
    is meshed, and again where frame t moved the region: the same frames, faces and numbers as one at a
    time, through a face lost and found again (the turned clip) and a moving head; the regions did
    move (so the redo path ran)."""
    import dataclasses

    frames = media.read_video(path, max_frames=n).frames
    results = {}
    for workers in (1, 2):
        with FaceTracker(dataclasses.replace(FaceConfig(), mesh_workers=workers)) as tracker:
            results[workers] = list(tracker.track((i / 25, f) for i, f in enumerate(frames)))
    one, two = results[1], results[2]
    assert [t.index for t in one] == [t.index for t in two] == list(range(len(frames)))
    for a, b in zip(one, two):
        assert (a.face is None) == (b.face is None)
        if a.face is not None:
            np.testing.assert_array_equal(a.face.landmarks, b.face.landmarks)
            np.testing.assert_array_equal(a.face.region, b.face.region)
    regions = {tuple(t.face.region) for t in one if t.face is not None}
    assert len(regions) > 1
    if path == LRS2_YAW_CLIP:
        assert any(t.face is None for t in one)


def test_a_failing_source_gives_every_frame_before_its_error_when_meshing_ahead():
    frames = media.read_video(GRID_CLIP, max_frames=6).frames

    def source():
        for i, frame in enumerate(frames):
            yield i / 25, frame
        raise OSError("the file ends in garbage")

    got = []
    with FaceTracker() as tracker, pytest.raises(OSError, match="garbage"):
        for item in tracker.track(source()):
            got.append(item.index)
    assert got == list(range(6))


def test_two_people_clip_needs_a_face_index():
    with pytest.raises(SeveralFacesError):
        track(TWO_PEOPLE_CLIP, n=3)
    left = track(TWO_PEOPLE_CLIP, n=10, config=FaceConfig(face_index=0))
    right = track(TWO_PEOPLE_CLIP, n=10, config=FaceConfig(face_index=1))
    assert all(f.valid for f in left + right)
    assert left[-1].frame_landmarks[:, 0].mean() < right[-1].frame_landmarks[:, 0].mean()


@pytest.mark.parametrize("path,crop_size", [(GRID_CLIP, 256), (LRS2_CLIP, 128), (LRS2_CLIP, 256)])
def test_paste_back_round_trip_is_seamless(path, crop_size):
    """Crop a real frame and paste the crop back: ≥ 40 dB outside the feather band, and not a single
    pixel changed outside the pasted footprint. (The crop must have the face's resolution: shrinking
    a large face to 128 px and back loses detail, whatever the warp.)"""
    frames = track(path, n=12, config=FaceConfig())
    frame = frames[-1]
    aligner = FaceAligner(AlignConfig(crop_size=crop_size))
    transform = rescale_transform(frame.aligned.transform, 128, crop_size)
    crop = aligner.align(frame.image, frame.frame_landmarks, transform=transform).crop
    pasted = aligner.paste_back(frame.image, crop, transform)
    alpha = aligner.paste_alpha(frame.image.shape, transform)
    outside_band = (alpha < 1e-3) | (alpha > 0.999)
    assert psnr(pasted, frame.image, outside_band) >= 40
    assert (pasted[alpha < 1e-3] == frame.image[alpha < 1e-3]).all()
    assert (alpha > 0.999).sum() > 0.1 * alpha.size / 4  # the face really was pasted


def test_a_pasted_region_is_only_where_its_mask_reaches_and_blends_as_the_whole_crop_would():
    frame = track(GRID_CLIP, n=1)[0]
    aligner = FaceAligner(AlignConfig(crop_size=256))
    transform = rescale_transform(frame.aligned.transform, 128, 256)
    crop = np.full((256, 256, 3), 255, np.uint8)  # a white crop: where it is blended in shows
    mask = aligner.lower_face_mask(rescale_points(frame.aligned.landmarks[:, :2], 128, 256))
    whole = aligner.paste_alpha(frame.image.shape, transform, mask)  # the blend weight over the whole frame
    expected = np.clip(frame.image + whole[..., None] * (255.0 - frame.image) + 0.5, 0, 255).astype(np.uint8)
    region = aligner.paste_region(frame.image, crop, transform, mask)
    x0, y0, x1, y1 = aligner.paste_box(frame.image.shape, transform)
    assert region.pixels.shape[0] * region.pixels.shape[1] < 0.8 * (x1 - x0) * (y1 - y0)  # the lower face only
    placed = region.place(frame.image)
    assert np.abs(placed.astype(int) - expected).max() <= 2
    assert (placed[whole == 0] == frame.image[whole == 0]).all()
    assert aligner.paste_region(frame.image, crop, transform, np.zeros_like(mask)).pixels.size == 0


def test_lower_face_mask_covers_mouth_and_jaw_not_eyes():
    frames = track(GRID_CLIP, n=30)
    aligner = FaceAligner()
    for f in frames[::10]:
        mask = aligner.lower_face_mask(f.aligned.landmarks)
        assert mask.shape == (128, 128) and mask.dtype == np.float32 and 0 <= mask.min() and mask.max() <= 1
        points = np.round(f.aligned.landmarks[:, :2]).astype(int)
        mouth = points[np.concatenate([lm.LIPS_OUTER, lm.LIPS_INNER])]
        assert mask[mouth[:, 1], mouth[:, 0]].min() > 0.9
        eyes = points[np.concatenate([lm.RIGHT_EYE_CORNERS, lm.LEFT_EYE_CORNERS])]
        assert mask[eyes[:, 1], eyes[:, 0]].max() < 0.05


def test_lower_face_mask_drawn_in_its_box_is_the_whole_crops_mask():
    """The mask drawn in its polygon's box, with the wide dilation by rows and the wide blur at half
    resolution, against OpenCV's own steps on the whole crop: equal at 128 (within 1e-4); at larger
    crops within 0.005, and 0.05 within 4σ of the crop's edge (measured 0.003 and 0.039)."""
    import cv2

    face = track(GRID_CLIP, n=1)[0].aligned.landmarks[:, :2]
    for size, shift in ((128, (0, 0)), (384, (0, 0)), (384, (-150, 0)), (256, (40, 110)), (256, (0, -120))):
        aligner = FaceAligner(AlignConfig(crop_size=size))
        points = face * size / 128 + shift
        whole = np.zeros((size, size), np.uint8)  # the mask drawn on the whole crop, step by step
        cv2.fillPoly(whole, [np.round(lm.lower_face_polygon(points) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        grow = max(1, round(aligner.config.lower_face_dilate_frac * size))
        whole = cv2.dilate(whole, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
        whole = np.maximum(whole, np.pad(whole, ((grow, 0), (0, 0)))[:size]).astype(np.float32) / 255
        sigma = max(0.5, aligner.config.feather_frac * size / 2)
        whole = np.clip(cv2.GaussianBlur(whole, (0, 0), sigma), 0, 1)
        error = np.abs(aligner.lower_face_mask(points) - whole)
        edge = int(np.ceil(4 * sigma))
        inside = error[edge:-edge, edge:-edge].max()
        assert (inside < 1e-4 and error.max() < 1e-4) if size == 128 else (inside < 0.005 and error.max() < 0.05), (size, shift, inside, error.max())


def test_the_wide_dilation_is_opencvs():
    """`dilate_disc` by rows equals cv2.dilate with the elliptical element, on scattered points and a
    filled face polygon, small and wide elements."""
    import cv2

    from avatar.face.align import dilate_disc

    dots = (np.random.default_rng(0).random((200, 300)) > 0.995).astype(np.uint8) * 255
    polygon = np.zeros((384, 384), np.uint8)
    cv2.fillPoly(polygon, [np.round(lm.lower_face_polygon(track(GRID_CLIP, n=1)[0].aligned.landmarks[:, :2] * 3) * 16).astype(np.int32)],
                 255, cv2.LINE_AA, shift=4)
    for image in (dots, polygon):
        for grow in (2, 5, 8, 15, 16):
            expected = cv2.dilate(image, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
            assert np.array_equal(dilate_disc(image, grow), expected), grow


def test_masks_drawn_in_their_box_are_the_whole_crops():
    """The mouth hole (`_polygon_mask`) and the bank entry's lips region (`lips_region`), drawn and
    blurred in their polygon's box only, equal OpenCV's steps on the whole crop (to 1e-6: the blur's
    float rounding moves with the box, 3e-11 measured), also where the polygon meets the crop's edge;
    `nonzero_box` bounds exactly the pixels above 0."""
    import cv2

    from avatar.face.align import nonzero_box
    from avatar.render.retrieval import LIPS_FEATHER, LIPS_GROW, lips_region
    from avatar.render.warp import INNER, N_OUTER, _polygon_mask, mouth_width

    mouth = track(GRID_CLIP, n=1)[0].aligned.landmarks[lm.MOUTH_AND_JAW, :2]
    for size, shift in ((128, (0, 0)), (256, (70, 40)), (256, (110, 80)), (128, (-50, 0))):
        points = mouth * size / 128 + shift
        width = mouth_width(points)
        for sigma in (0.6, 3.0):
            whole = np.zeros((size, size), np.uint8)
            cv2.fillPoly(whole, [np.round(points[INNER] * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
            expected = cv2.GaussianBlur(whole.astype(np.float32) / 255, (0, 0), sigma)
            assert np.abs(_polygon_mask(points[INNER], size, sigma) - expected).max() < 1e-6, (size, shift, sigma)
        whole = np.zeros((size, size), np.uint8)
        cv2.fillPoly(whole, [np.round(points[:N_OUTER] * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        grow = max(1, round(LIPS_GROW * width))
        whole = cv2.dilate(whole, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
        expected = cv2.GaussianBlur(whole.astype(np.float32) / 255, (0, 0), max(0.5, LIPS_FEATHER * width))
        region = lips_region(points, size)
        assert np.abs(region - expected).max() < 1e-6, (size, shift)
        ys, xs = np.nonzero(expected > 0)
        assert nonzero_box(region) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert nonzero_box(np.zeros((8, 8), np.float32)) is None


def test_crop_sizes_agree():
    frames = track(LRS2_CLIP, n=5)
    f = frames[-1]
    big = FaceAligner(AlignConfig(crop_size=256)).align(f.image, f.frame_landmarks,
                                                         transform=rescale_transform(f.aligned.transform, 128, 256))
    assert np.allclose((f.aligned.landmarks[:, :2] + 0.5) * 2 - 0.5, big.landmarks[:, :2], atol=1e-3)
    small_again = apply_transform(big.landmarks[:, :2], rescale_transform(np.hstack([np.eye(2), np.zeros((2, 1))]), 256, 128))
    assert np.allclose(small_again, f.aligned.landmarks[:, :2], atol=1e-3)


def test_mediapipe_is_imported_without_matplotlib_which_other_code_still_gets_whole():
    import subprocess
    import sys

    code = ("import sys\n"
            "from avatar.face.mediapipe_loader import import_face_mesh\n"
            "import_face_mesh()\n"
            "assert 'matplotlib' not in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
            "from mediapipe.python.solutions import drawing_utils\n"
            "import matplotlib.pyplot as plt\n"
            "assert type(plt).__name__ == 'module' and drawing_utils.plt.figure is plt.figure\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_second_tracker_reads_the_same_mouth_as_the_mesh_and_nothing_where_there_is_no_face():
    """dlib's 68 points (`avatar eval --second-tracker`) follow a real speaker's inner-lip gap as the
    mesh does, on its own detections; a frame without a face gives NaN, not a number."""
    from avatar.face.dlib_shape import DlibMouthTracker
    from avatar.metrics import pearson

    frames = media.read_video(GRID_CLIP, max_frames=75).frames
    tracker = DlibMouthTracker()
    ours = tracker.openings(frames)
    assert np.isfinite(ours).all()
    mesh = np.stack([item.frame_landmarks for item in align_video(((i / 25, f) for i, f in enumerate(frames)))])
    theirs = lm.mouth_opening(mesh) / lm.interocular(mesh)
    assert pearson(ours, theirs) > 0.8
    assert 0.67 < ours.max() / theirs.max() < 1.5  # the same measure: the widest opening of the clip on the same scale
    blank = np.full((288, 360, 3), 128, np.uint8)
    assert np.isnan(tracker.openings([blank, np.zeros_like(frames[0])])).all()
