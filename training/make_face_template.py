"""Build the canonical face template (`avatar/face/face_template.npy`) from real frontal portraits.

    python -m training.make_face_template --faces ../shared/data/faces

Every portrait in the folder is run through the face tracker; faces that are frontal (|yaw| < 8°)
and large (≥ 120 px) are kept, aligned to each other by generalised Procrustes analysis over all
478 landmarks, and averaged. The mean is normalised: eye-centre midpoint at (0, 0), eyes on the x
axis, inter-ocular distance 1.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from tqdm import tqdm

from avatar import media
from avatar.config import FaceConfig
from avatar.errors import AvatarError
from avatar.face import landmarks as lm
from avatar.face.align import apply_transform, similarity_transform
from avatar.face.tracker import FaceTracker


def normalise(points: np.ndarray) -> np.ndarray:
    """Put eye-centre midpoint at the origin, eyes on the x axis, inter-ocular distance 1."""
    eyes = lm.eye_centres(points)
    target = np.array([[-0.5, 0.0], [0.5, 0.0]])
    return apply_transform(points, similarity_transform(eyes, target))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", default="../shared/data/faces", type=pathlib.Path)
    parser.add_argument("--output", default=pathlib.Path(__file__).resolve().parents[1] / "avatar/face/face_template.npy",
                        type=pathlib.Path)
    args = parser.parse_args(argv)
    files = sorted(p for p in args.faces.rglob("*") if p.suffix.lower() in media.IMAGE_SUFFIXES)
    tracker = FaceTracker(FaceConfig(max_faces=8))
    shapes = []
    for path in tqdm(files, desc="portraits", unit="img"):
        try:
            faces = tracker.detect(media.read_image(path))
        except AvatarError:
            continue
        for face in faces:
            if face.size >= 120 and abs(float(lm.yaw_degrees(face.landmarks))) < 8.0:
                shapes.append(normalise(face.landmarks[:, :2]))
    if len(shapes) < 20:
        raise SystemExit(f"only {len(shapes)} frontal faces found in {args.faces}; need at least 20")
    shapes = np.stack(shapes)
    mean = shapes.mean(0)
    for _ in range(10):  # generalised Procrustes: align every shape to the mean, re-average
        aligned = np.stack([apply_transform(s, similarity_transform(s, mean)) for s in shapes])
        mean = normalise(aligned.mean(0))
    residual = np.sqrt(((aligned - mean) ** 2).sum(-1)).mean()
    np.save(args.output, mean.astype(np.float32))
    print(f"{len(shapes)} frontal faces from {len(files)} images; mean residual {residual:.3f} IOD; wrote {args.output}")


if __name__ == "__main__":
    main()
