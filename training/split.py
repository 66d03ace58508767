"""Train/validation split by identity (never by clip).

An identity is in validation when a keyed hash of its name (seed `VAL_SEED`) falls below
`VAL_FRACTION`, so the split does not depend on file order and stays put when data is added.
`VALIDATION_IDENTITIES` is that rule's output on `../shared/data/manifest.csv`, written out so that
it is documented and checked (`tests/test_preprocess.py` recomputes it).
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import typing

VAL_SEED = 20261122
VAL_FRACTION = 0.22


def person_key(identity: str, file: str) -> str:
    """The person a manifest row shows. The manifest's `identity` is per clip for some sources, so:

    - LipReadingQuiz (`LRQ-…`): the speaker in the file name (`….nicole1.mp4` → `LRQ-nicole`);
    - StyleTalk style clips (`ST-…_clipN`): one person per clip family; `ST-Obama…` is Obama and
      `ST-trump…` is Trump, who also appear in the talking videos;
    - EAMM's emotion clips come from MEAD like `MEAD-M030`'s clip in the same repository: grouped
      with it, so that a possible match cannot leak across the split.
    """
    name = pathlib.PurePosixPath(file).name
    if identity.startswith("LRQ-"):
        match = re.search(r"\.([a-z]+)\d*\.mp4$", name)
        return f"LRQ-{match.group(1)}" if match else identity
    if identity.startswith("ST-"):
        family = re.sub(r"_clip\d+$", "", identity[3:])
        return {"Obama": "Obama", "trump": "Trump"}.get(family, f"ST-{family}")
    if identity.startswith("EAMM-"):
        return "MEAD-M030"
    return identity


def is_validation(identity: str, seed: int = VAL_SEED, fraction: float = VAL_FRACTION) -> bool:
    digest = hashlib.sha256(f"{seed}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def split_identities(identities: typing.Iterable[str], seed: int = VAL_SEED,
                     fraction: float = VAL_FRACTION) -> typing.Dict[str, typing.List[str]]:
    ids = sorted(set(identities))
    val = [i for i in ids if is_validation(i, seed, fraction)]
    return {"train": [i for i in ids if i not in val], "val": val}


# The rule's output on ../shared/data/manifest.csv (person keys), kept here as the documented list.
VALIDATION_IDENTITIES = (
    "CNN-anchor", "EDTalk-mouth", "GRID-A", "GRID-C", "GRID-E", "GRID-G", "German-anchor", "LRQ-smolinski",
    "LRS2-00006", "LRW-sample2", "LRW-sample3", "PCAVS-00010", "PCAVS-00015", "PCAVS-00473",
    "ST-furious_talk1", "ST-happyenglish", "ST-nice", "ST-spata", "ST-vscodehappy", "french",
)
