"""Do the lips close for /p b m/? Phone times from a forced alignment of a known sentence, and the
share of bilabials whose inner-lip gap falls below a threshold at that time.

GRID clips spell their sentence in their file names (`training.export_speech.grid_sentence`), so
pocketsphinx (its bundled US-English acoustic model and dictionary) aligns the words to the audio and
gives each phone's start and length at 100 frames/s. A bilabial counts as closed when the inner-lip
gap, in % of the inter-ocular distance, is below `CLOSED_PCT_IOD` on at least one video frame from
its start to its end (one frame of slack each side: the lips close before the release that the
aligner hears). The same rule is applied to the real video, which sets what "closed" means there.
"""

from __future__ import annotations

import pathlib
import typing

import numpy as np

CLOSED_PCT_IOD = 3.0  # inner-lip gap below this (% of the inter-ocular distance): closed
BILABIALS = ("P", "B", "M")


def bilabial_spans(samples: np.ndarray, sentence: str) -> typing.List[typing.Tuple[str, float, float]]:
    """16 kHz mono `(N,) float32` + its words → `[(phone, start_s, end_s)]` for every /p b m/."""
    from pocketsphinx import Decoder

    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes()
    decoder = Decoder(lm=None, loglevel="FATAL")
    decoder.set_align_text(sentence.lower())
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    decoder.set_alignment()  # second pass: phone-level alignment of the words found
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    alignment = decoder.get_alignment()
    if alignment is None:
        raise ValueError(f"the sentence {sentence!r} could not be aligned to the audio")
    return [(phone.name, phone.start / 100.0, (phone.start + phone.duration) / 100.0)
            for word in alignment for phone in word if phone.name in BILABIALS]


def closure_rate(gap_pct_iod: np.ndarray, spans: typing.Sequence[typing.Tuple[str, float, float]], fps: float,
                 keep: typing.Optional[np.ndarray] = None) -> typing.Tuple[int, int]:
    """(closed, counted) bilabials: `gap_pct_iod: (T,)` inner-lip gap per video frame in % IOD; spans
    from `bilabial_spans`; frames outside `keep` are not looked at (a span with none is not counted)."""
    keep = np.ones(gap_pct_iod.shape, bool) if keep is None else keep
    closed = counted = 0
    for _, start, end in spans:
        frames = np.arange(max(0, int(np.floor(start * fps)) - 1), min(gap_pct_iod.size, int(np.ceil(end * fps)) + 1))
        frames = frames[keep[frames]] if frames.size else frames
        if frames.size == 0:
            continue
        counted += 1
        closed += int(gap_pct_iod[frames].min() < CLOSED_PCT_IOD)
    return closed, counted


def grid_code(file: str) -> typing.Optional[str]:
    """The GRID sentence code of a manifest file (`video/rizkiarm__LipNet/pwij3p.mpg` → `pwij3p`), or None."""
    path = pathlib.PurePosixPath(file)
    if "LipNet" not in str(path.parent) or path.suffix != ".mpg":
        return None
    return path.stem.split("_")[-1]
