"""Viseme pseudo-labels for speech, from pocketsphinx's English phone recogniser (bundled in its wheel).

    python -m training.visemes --src ../shared/data --cache cache

Phones are grouped into 13 visemes (mouth shapes that look alike: p/b/m, f/v, ...). Labels are per
mel frame (80 per second), so they line up with the motion model's inputs. They are noisy (an
English phone loop, also run on German, French, Chinese... speech), which is fine for what they
are for: an auxiliary training target that pushes the audio encoder towards speaker-independent,
mouth-relevant features, on the talking videos and on the speech-only clips alike.

Writes `visemes.npy` (int8, one per mel frame) into every cached talking clip, and
`<cache>/speech/<id>.npz` (`mel` float16, `visemes` int8) for every speech-only clip of the manifest.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import pathlib
import sys
import typing

import numpy as np
from tqdm import tqdm

from avatar import media
from avatar.audio import MelFrontend

VISEMES = ("sil", "PBM", "FV", "TH", "TDNL", "SZ", "SHCH", "KG", "R", "W", "IY", "EH", "AA")
_GROUPS = {
    "PBM": "P B M", "FV": "F V", "TH": "TH DH", "TDNL": "T D N L DX", "SZ": "S Z", "SHCH": "SH ZH CH JH",
    "KG": "K G NG HH", "R": "R ER", "W": "W UW UH OW OY", "IY": "Y IY IH", "EH": "EH AE EY", "AA": "AA AH AO AW AY",
}
PHONE_TO_VISEME = {phone: VISEMES.index(group) for group, phones in _GROUPS.items() for phone in phones.split()}
IGNORE = -1


class VisemeLabeller:
    """`labels(samples)` → `(1 + N // 200,) int8` viseme index per mel frame (0 = silence or noise)."""

    def __init__(self):
        from pocketsphinx import Config, Decoder, get_model_path

        model = pathlib.Path(get_model_path()) / "en-us"
        config = Config(hmm=str(model / "en-us"), allphone=str(model / "en-us-phone.lm.bin"), lm=None, dict=None,
                        lw=2.0, beam=1e-20, pbeam=1e-20, logfn=os.devnull)
        self.decoder = Decoder(config)

    def labels(self, samples: np.ndarray) -> np.ndarray:
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        n_mel = 1 + samples.size // 200
        per_10ms = np.zeros(n_mel * 2 + 8, np.int8)
        for segment in self.decoder.seg():
            per_10ms[segment.start_frame : segment.end_frame + 1] = PHONE_TO_VISEME.get(segment.word, 0)
        centre_10ms = np.round(np.arange(n_mel) * 1.25).astype(np.int64)  # mel frame j is centred at j * 12.5 ms
        return per_10ms[np.minimum(centre_10ms, per_10ms.size - 1)]


_LABELLER: typing.Optional[VisemeLabeller] = None


def _label_job(job: typing.Tuple[str, str, str]) -> str:
    """(kind, source media, output) → output; kind 'clip' writes visemes.npy, 'speech' an npz with the mel."""
    global _LABELLER
    kind, source, output = job
    _LABELLER = _LABELLER or VisemeLabeller()
    samples = media.read_audio(source, 16000)
    labels = _LABELLER.labels(samples)
    out = pathlib.Path(output)
    tmp = out.with_name(f".{out.name}.tmp")
    if kind == "clip":
        with open(tmp, "wb") as f:
            np.save(f, labels)
    else:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, mel=MelFrontend()(samples).astype(np.float16), visemes=labels)
    os.replace(tmp, out)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.visemes", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=pathlib.Path, default=pathlib.Path("../shared/data"))
    parser.add_argument("--cache", type=pathlib.Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    from training.cache import open_cache
    from training.preprocess import clip_id_for

    jobs = []
    for clip in open_cache(args.cache, kind="video"):
        if clip.has_audio and not (clip.folder / "visemes.npy").exists():
            jobs.append(("clip", str(args.src / clip.meta["file"]), str(clip.folder / "visemes.npy")))
    speech_dir = args.cache / "speech"
    speech_dir.mkdir(parents=True, exist_ok=True)
    with (args.src / "manifest.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            target = speech_dir / f"{clip_id_for(row['file'])}.npz"
            if row["kind"] == "speech" and not target.exists():
                jobs.append(("speech", str(args.src / row["file"]), str(target)))
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for _ in tqdm(pool.imap_unordered(_label_job, jobs), total=len(jobs), desc="viseme labels", unit="file"):
            pass
    print(f"labelled {len(jobs)} files; speech-only clips in {speech_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
