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

# Points that do not move with speech or expression: the frame of the canonical alignment.
STABLE = np.concatenate([RIGHT_EYE_CORNERS, LEFT_EYE_CORNERS, NOSE_BRIDGE])

# What the motion model predicts and the renderer draws: lips (outer and inner) and jaw.
MOUTH_AND_JAW = np.concatenate([LIPS_OUTER, LIPS_INNER, JAW])


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    """`(..., 478, 2+)` → `(..., 2, 2)`: the subject's right and left eye centres (mean of the corners)."""
    right = landmarks[..., RIGHT_EYE_CORNERS, :2].mean(axis=-2)
    left = landmarks[..., LEFT_EYE_CORNERS, :2].mean(axis=-2)
    return np.stack([right, left], axis=-2)


def interocular(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the eye centres, `(...)`, in the landmarks' units."""
    eyes = eye_centres(landmarks)
    return np.linalg.norm(eyes[..., 1, :] - eyes[..., 0, :], axis=-1)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap (upper to lower inner lip, centre), `(...)`, in the landmarks' units."""
    return np.linalg.norm(landmarks[..., LOWER_LIP_INNER, :2] - landmarks[..., UPPER_LIP_INNER, :2], axis=-1)


def yaw_degrees(landmarks: np.ndarray) -> np.ndarray:
    """Rough head yaw from the nose tip's place between the cheeks, `(...)` degrees (0 = frontal).

    Positive when the nose points to the image's right.
    """
    right_cheek = landmarks[..., 234, :2]
    left_cheek = landmarks[..., 454, :2]
    nose = landmarks[..., NOSE_TIP, :2]
    width = np.linalg.norm(left_cheek - right_cheek, axis=-1)
    axis = (left_cheek - right_cheek) / np.maximum(width, 1e-9)[..., None]
    along = ((nose - right_cheek) * axis).sum(-1) / np.maximum(width, 1e-9)  # 0.5 when frontal
    return np.degrees(np.arcsin(np.clip(2.0 * along - 1.0, -1.0, 1.0)))
