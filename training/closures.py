"""Do the lips close for /p b m/? Phone times from a forced alignment of a known sentence, and the
share of bilabials whose inner-lip gap falls below a threshold at that time.

GRID clips spell their sentence in their file names (`training.export_speech.grid_sentence`), so
pocketsphinx (its bundled US-English acoustic model and dictionary) aligns the words to the audio and
gives each phone's start and length at 100 frames/s. A bilabial counts as closed when the inner-lip
gap, in % of the inter-ocular distance, is below `CLOSED_PCT_IOD` on at least one video frame from
its start to its end (one frame of slack each side: the lips close before the release that the
aligner hears). The same rule is applied to the real video, which sets what "closed" means there.

Seven held-out bilabials are too few to choose anything by, and most clips have no transcript, so
`closure_events` also counts the real video's own closures in speech, on every clip: each short run
of frames whose real inner-lip gap is under the threshold, with open lips on both sides and the voice
on around it (in running speech nearly all of these are /p b m/). `events_closed` counts those a
prediction closes too; `false_closures` counts the clearly open voiced real frames (twice the
threshold) that it closes, so that a mouth which shuts all the time cannot score.
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


EVENT_MAX_S = 0.4  # a longer run of closed real lips is a pause, not a consonant
EVENT_VOICE = 0.5  # voice activity that must be reached within EVENT_VOICE_S of the run
EVENT_VOICE_S = 0.12


def closure_events(gap_pct_iod: np.ndarray, voice: np.ndarray, fps: float,
                   keep: typing.Optional[np.ndarray] = None) -> typing.List[typing.Tuple[int, int]]:
    """The real video's closures in speech: `[(first, last)]` frames of each run of kept frames whose
    inner-lip gap (`(T,)`, % IOD) is under `CLOSED_PCT_IOD`, at most `EVENT_MAX_S` long, with open kept
    frames right before and after it, and voice activity (`voice: (T,)` in [0, 1]) of at least
    `EVENT_VOICE` within `EVENT_VOICE_S` of it."""
    keep = np.ones(gap_pct_iod.shape, bool) if keep is None else keep
    closed = keep & (gap_pct_iod < CLOSED_PCT_IOD)
    opened = keep & (gap_pct_iod >= CLOSED_PCT_IOD)
    reach, longest = int(round(EVENT_VOICE_S * fps)), int(round(EVENT_MAX_S * fps))
    events, t, n = [], 0, gap_pct_iod.size
    while t < n:
        if not closed[t]:
            t += 1
            continue
        first = t
        while t < n and closed[t]:
            t += 1
        last = t - 1
        bounded = first > 0 and opened[first - 1] and t < n and opened[t]
        voiced = voice[max(0, first - reach):min(n, last + reach + 1)].max(initial=0.0) >= EVENT_VOICE
        if bounded and voiced and last - first + 1 <= longest:
            events.append((first, last))
    return events


def events_closed(gap_pct_iod: np.ndarray, events: typing.Sequence[typing.Tuple[int, int]]) -> int:
    """How many `closure_events` a predicted gap `(T,)` (% IOD) also closes: under `CLOSED_PCT_IOD` on
    some frame of the run or one frame either side."""
    return sum(int(gap_pct_iod[max(0, first - 1):last + 2].min() < CLOSED_PCT_IOD) for first, last in events)


def false_closures(gap_pct_iod: np.ndarray, real_gap_pct_iod: np.ndarray, voice: np.ndarray,
                   keep: typing.Optional[np.ndarray] = None) -> typing.Tuple[int, int]:
    """(closed by the prediction, counted): voiced kept frames (`voice` ≥ `EVENT_VOICE`) whose real lips
    are clearly open (gap ≥ 2 × `CLOSED_PCT_IOD`), and how many of them the prediction closes."""
    keep = np.ones(gap_pct_iod.shape, bool) if keep is None else keep
    opened = keep & (voice >= EVENT_VOICE) & (real_gap_pct_iod >= 2 * CLOSED_PCT_IOD)
    return int((gap_pct_iod[opened] < CLOSED_PCT_IOD).sum()), int(opened.sum())


def grid_code(file: str) -> typing.Optional[str]:
    """The GRID sentence code of a manifest file (`video/rizkiarm__LipNet/pwij3p.mpg` → `pwij3p`), or None."""
    path = pathlib.PurePosixPath(file)
    if "LipNet" not in str(path.parent) or path.suffix != ".mpg":
        return None
    return path.stem.split("_")[-1]
