"""Make the project's own demo samples in `assets/samples/` (run once; the outputs are committed).

- `portrait.jpg`: "astronaut" from scikit-image's bundled data: NASA photo of Eileen Collins,
  public domain (a work of the U.S. federal government), 512×512.
- `speech.flac`: English speech synthesised with espeak-ng (Debian package `espeak-ng`), 16 kHz
  mono, with pauses so that silence handling shows.

    python assets/make_samples.py        # needs espeak-ng on PATH
"""

import pathlib
import subprocess
import tempfile

import numpy as np
from PIL import Image
from skimage import data

from avatar import media

HERE = pathlib.Path(__file__).resolve().parent / "samples"
TEXT = ("Hello! I am a talking head, made from one photo and a voice. "
        "[[ ]] Watch my lips: ba, ma, pa. Oh, wow, you, me. [[ ]] Thank you for listening.")


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.astronaut()).save(HERE / "portrait.jpg", quality=92)
    with tempfile.TemporaryDirectory() as tmp:
        wav = pathlib.Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-g", "6", "-w", str(wav), TEXT], check=True)
        audio = media.read_audio(wav, 16000)
    silence = np.zeros(8000, np.float32)
    media.write_audio(HERE / "speech.flac", np.concatenate([silence, 0.9 * audio / np.abs(audio).max(), silence]), 16000)
    print(f"wrote {HERE / 'portrait.jpg'} and {HERE / 'speech.flac'}")


if __name__ == "__main__":
    main()
