"""Identity-drift checks on real clips: the same person stays within thresholds, another person and
corrupted outputs (colour shift, a pasted face) raise alarms and call the hook."""

import numpy as np
import pytest

from avatar import media
from avatar.config import IdentityConfig
from avatar.face.align import FaceAligner
from avatar.face.video import align_video
from avatar.identity import DriftMonitor, FaceEmbedder, _region_masks
from conftest import DATA

PERSON_A = DATA / "video/OpenTalker__SadTalker/WDA_KatieHill_000.mp4"
PERSON_B = DATA / "video/OpenTalker__SadTalker/RD_Radio34_000.mp4"


def frames(path, n):
    return [f for f, _ in zip(align_video(media.iter_video_frames(path)), range(n))]


@pytest.fixture(scope="module")
def person_a():
    return frames(PERSON_A, 160)


@pytest.fixture(scope="module")
def person_b():
    return frames(PERSON_B, 40)


@pytest.fixture(scope="module")
def embedder():
    return FaceEmbedder()


def monitor_for(person_a, embedder, hook=None, **config):
    references = [(person_a[i].image, person_a[i].frame_landmarks) for i in (0, 50, 100)]
    return DriftMonitor(references, IdentityConfig(**config), embedder=embedder, on_alarm=hook)


def test_the_onnx_network_gives_dlibs_descriptors(person_a, person_b, embedder):
    """dlib's face-recognition network read from its own file and run by onnxruntime gives the
    numbers dlib's `compute_face_descriptor` gives, on face chips of two real people (to float
    rounding); the two people stay apart and one person's frames together."""
    import dlib

    from avatar.identity import EMBEDDING_MODEL, face_model_file

    reference = dlib.face_recognition_model_v1(str(face_model_file(EMBEDDING_MODEL)))
    descriptors = {}
    for name, person in (("a", person_a[::40]), ("b", person_b[::20])):
        for f in person:
            x0, y0 = f.frame_landmarks[:, :2].min(axis=0)
            x1, y1 = f.frame_landmarks[:, :2].max(axis=0)
            image = np.ascontiguousarray(f.image)
            shape = embedder.shape_predictor(image, dlib.rectangle(int(x0), int(y0), int(x1), int(y1)))
            chip = dlib.get_face_chip(image, shape, size=150, padding=0.25)
            ours = embedder.recogniser.run(chip=chip[None])["descriptor"][0]
            np.testing.assert_allclose(ours, np.asarray(reference.compute_face_descriptor(chip), np.float32), atol=1e-5)
            np.testing.assert_array_equal(ours, embedder.embed(f.image, f.frame_landmarks))
            descriptors.setdefault(name, []).append(ours)
    a, b = np.stack(descriptors["a"]), np.stack(descriptors["b"])
    assert len(a) >= 4 and len(b) >= 2
    assert np.linalg.norm(a[:, None] - b[None], axis=-1).min() > 0.6 > np.linalg.norm(a[:, None] - a[None], axis=-1).max()


def test_same_person_across_a_clip_stays_well_within_thresholds(person_a, embedder):
    monitor = monitor_for(person_a, embedder, sample_every_s=0.2)
    for f in person_a[1:]:
        monitor.observe(f.timestamp, f.image, f.frame_landmarks)
    summary = monitor.summary()
    assert summary["samples"] >= 25 and summary["alarms"] == []
    assert summary["signals"]["identity"]["max"] < 0.5  # threshold 0.55 (measured 0.456)
    assert summary["signals"]["colour"]["max"] < 7  # threshold 10
    assert summary["signals"]["geometry"]["max"] < monitor.config.geometry_threshold
    seconds = monitor.per_second()
    assert [row["second"] for row in seconds] == list(range(len(seconds))) and set(seconds[0]) == {"second", "identity", "geometry", "colour"}


def test_another_person_exceeds_the_threshold_and_calls_the_hook(person_a, person_b, embedder):
    fired = []
    monitor = monitor_for(person_a, embedder, hook=fired.append, sample_every_s=0.2)
    for f in person_b:
        monitor.observe(f.timestamp, f.image, f.frame_landmarks)
    distances = [s.identity for s in monitor.samples]
    assert min(distances) > 0.55
    assert [a.kind for a in fired] == ["identity"] and monitor.alarm_active
    assert monitor.summary()["alarms"][0]["end"] is None


def test_colour_shift_of_the_repainted_region_raises_a_colour_alarm_and_it_clears(person_a, embedder):
    fired = []
    monitor = monitor_for(person_a, embedder, hook=fired.append, sample_every_s=0.0)
    for i, f in enumerate(person_a[110:130]):
        image = f.image
        if 4 <= i < 12:  # a reddish, darker mouth region for 8 frames
            lower, _ = _region_masks(image.shape[:2], f.frame_landmarks)
            shifted = image.astype(np.int16)
            shifted[lower] += np.array([25, -15, -15], np.int16)
            image = np.clip(shifted, 0, 255).astype(np.uint8)
        monitor.observe(f.timestamp, image, f.frame_landmarks)
    kinds = [a.kind for a in fired]
    assert kinds == ["colour"], kinds
    alarm = monitor.alarms[0]
    assert alarm.end is not None and alarm.start < alarm.end  # ended once the colour came back
    assert alarm.peak > 10


def test_another_face_pasted_in_raises_an_identity_alarm(person_a, person_b, embedder):
    fired = []
    monitor = monitor_for(person_a, embedder, hook=fired.append, sample_every_s=0.0)
    aligner = FaceAligner()
    intruder = aligner.align(person_b[20].image, person_b[20].frame_landmarks).crop
    for f in person_a[120:126]:
        pasted = aligner.paste_back(f.image, intruder, aligner.transform_for(f.frame_landmarks))
        monitor.observe(f.timestamp, pasted, f.frame_landmarks)
    assert "identity" in [a.kind for a in fired]


def test_monitor_needs_references(embedder):
    with pytest.raises(ValueError, match="reference"):
        DriftMonitor([], embedder=embedder)


def test_a_damaged_network_file_gives_one_line(tmp_path):
    """dlib's network file cut short, or another file: a one-line AvatarError naming it."""
    from avatar.errors import AvatarError
    from avatar.face.dlib_resnet import read_dlib_resnet
    from avatar.identity import EMBEDDING_MODEL, face_model_file

    data = face_model_file(EMBEDDING_MODEL).read_bytes()
    for name, content in (("cut.dat", data[: len(data) // 2]), ("other.dat", b"\x01\x05hello" * 100)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(AvatarError) as error:
            read_dlib_resnet(tmp_path / name)
        assert name in str(error.value) and "\n" not in str(error.value)
