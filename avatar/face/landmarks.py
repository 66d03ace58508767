"""Named subsets of mediapipe's 478 face-mesh landmarks (indices into `(478, 2|3)` arrays).

Left/right are the subject's: RIGHT_EYE is on the image's left in a frontal, unmirrored photo.
"""

import numpy as np

N_LANDMARKS = 478

LIPS_OUTER = np.array([61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291,
                       375, 321, 405, 314, 17, 84, 181, 91, 146])  # a closed contour from the right corner
LIPS_INNER = np.array([78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308,
                       324, 318, 402, 317, 14, 87, 178, 88, 95])
# The jaw: the lower face oval from the right cheek (at nose height) round the chin to the left cheek.
JAW = np.array([93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323])
FACE_OVAL = np.array([10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400,
                      377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109])
RIGHT_EYE_CORNERS = np.array([33, 133])  # outer, inner
LEFT_EYE_CORNERS = np.array([263, 362])  # outer, inner
NOSE_BRIDGE = np.array([168, 6, 197, 195])
NOSE_TIP = 1
SUBNASALE = 2
CHIN = 152
UPPER_LIP_INNER = 13
LOWER_LIP_INNER = 14
RIGHT_IRIS = np.arange(468, 473)
LEFT_IRIS = np.arange(473, 478)

# The nostril wings: they move rigidly with the head, not with speech, and sit at about the mouth's
# depth. Mouth motion is measured relative to them, which removes the shift of the whole mouth that
# head yaw and pitch cause in a crop aligned on the eyes.
MOUTH_ANCHOR = np.array([98, 327, 64, 294])

# Points that do not move with speech or expression: the frame of the canonical alignment.
STABLE = np.concatenate([RIGHT_EYE_CORNERS, LEFT_EYE_CORNERS, NOSE_BRIDGE])

# What the motion model predicts and the renderer draws: lips (outer and inner) and jaw.
MOUTH_AND_JAW = np.concatenate([LIPS_OUTER, LIPS_INNER, JAW])


MOUTH_UPPER_INNER = int(np.flatnonzero(MOUTH_AND_JAW == UPPER_LIP_INNER)[0])  # their places among MOUTH_AND_JAW
MOUTH_LOWER_INNER = int(np.flatnonzero(MOUTH_AND_JAW == LOWER_LIP_INNER)[0])


def inner_gap(mouth: np.ndarray) -> np.ndarray:
    """Inner-lip gap of mouth/jaw points `(..., 59, 2)` in MOUTH_AND_JAW order → `(...)`, in their units
    (`mouth_opening` is the same for a whole `(..., 478, 2+)` mesh)."""
    return np.linalg.norm(mouth[..., MOUTH_LOWER_INNER, :] - mouth[..., MOUTH_UPPER_INNER, :], axis=-1)


def with_mouth(landmarks: np.ndarray, mouth: np.ndarray) -> np.ndarray:
    """A copy of `(478, 2+)` landmarks with the MOUTH_AND_JAW points moved to `mouth (59, 2)`."""
    out = np.array(landmarks, copy=True)
    out[MOUTH_AND_JAW, :2] = mouth
    return out


def mouth_width(mouth: np.ndarray) -> float:
    """Distance between the outer-lip corners (61 and 291) of mouth/jaw points `(59, 2)`."""
    return float(np.linalg.norm(mouth[0] - mouth[len(LIPS_OUTER) // 2]))


def inner_gap_ratio(mouth: np.ndarray) -> float:
    """Inner-lip gap over the mouth width, of mouth/jaw points `(59, 2)`."""
    return float(inner_gap(mouth) / max(mouth_width(mouth), 1e-6))


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    """`(..., 478, 2+)` → `(..., 2, 2)`: the subject's right and left eye centres (mean of the corners)."""
    right = landmarks[..., RIGHT_EYE_CORNERS, :2].mean(axis=-2)
    left = landmarks[..., LEFT_EYE_CORNERS, :2].mean(axis=-2)
    return np.stack([right, left], axis=-2)


def mouth_anchor(landmarks: np.ndarray) -> np.ndarray:
    """`(..., 478, 2+)` → `(..., 2)`: the point mouth motion is measured from (see MOUTH_ANCHOR)."""
    return landmarks[..., MOUTH_ANCHOR, :2].mean(axis=-2)


def lower_face_polygon(landmarks: np.ndarray) -> np.ndarray:
    """`(478, 2+)` → `(len(JAW) + 1, 2)`: the region the renderer repaints, along the jaw (cheek at nose
    height → chin → other cheek) and closed under the nose."""
    points = np.asarray(landmarks)[:, :2]
    return np.concatenate([points[JAW], points[[SUBNASALE]]], axis=0)


def interocular(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the eye centres, `(...)`, in the landmarks' units."""
    eyes = eye_centres(landmarks)
    return np.linalg.norm(eyes[..., 1, :] - eyes[..., 0, :], axis=-1)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap (upper to lower inner lip, centre), `(...)`, in the landmarks' units."""
    return np.linalg.norm(landmarks[..., LOWER_LIP_INNER, :2] - landmarks[..., UPPER_LIP_INNER, :2], axis=-1)


YAW_PAIRS = np.array([[33, 263], [133, 362], [234, 454], [93, 323], [58, 288]])  # subject's right → left


def yaw_degrees(landmarks: np.ndarray) -> np.ndarray:
    """Head yaw from the mesh's depth, `(...)` degrees (0 = frontal); needs `(..., 478, 3)` landmarks.

    For symmetric point pairs (eye corners, cheeks, jaw) the angle of the right → left vector out of
    the image plane, averaged. (Judging yaw from where the nose sits between the cheeks overstates it
    badly: the far cheek's landmarks slide along the silhouette.)
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.shape[-1] < 3:
        raise ValueError("yaw needs 3D landmarks (..., 478, 3)")
    d = landmarks[..., YAW_PAIRS[:, 1], :] - landmarks[..., YAW_PAIRS[:, 0], :]
    in_plane = np.linalg.norm(d[..., :2], axis=-1)
    return np.degrees(np.arctan2(d[..., 2], in_plane)).mean(axis=-1)
