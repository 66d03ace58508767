"""Live serving over WebRTC, as a browser sees it: `avatar serve`'s page in headless Chromium with a
fake microphone playing real speech (looped), one session.

    python -m benchmarks.webrtc [--seconds 40] [--renderer retrieval|warp|diffusion] [--transport webrtc|ws]

Printed once a second, from the page's own reports (`RTCPeerConnection.getStats`) and the server's:
the time from the answer to the first frame shown; the server's audio → frame latency p50/p95 (the
moment a frame's audio, look-ahead included, had arrived → the frame handed to the RTP sender); the
browser's current video and audio buffer delays (Chrome's jitter buffers, which its lip sync also
uses); decode time; the A/V offset as played (video minus audio playout time, both on the
sender's clock; > 0: the picture leads); frames shown and distinct; the server's voice behind its
pictures (p95 over the last 500 packets: how late a packet went out after its due time, 20 ms steps
from its frame's picture). Chrome aligns the two streams by the sender reports, which stamp each at
sending, so a voice sent late plays late against the pictures by as much while the A/V offset as
played (on those stamps) still reads 0: the two figures measure different halves of lip sync. Over
WebRTC a last line says when the A/V offset settled within one frame (the target) and its spread over
the last 10 reports. Needs `chromium` on PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shutil
import subprocess
import tempfile
import time
import typing

from avatar import media
from avatar.config import IdleConfig, RealtimeConfig
from avatar.render.renderers import RENDERERS

DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SPEECH = DATA / "speech/kleinlee__DH_live/audio0.wav"


def browser() -> typing.Optional[str]:
    """Chromium's path, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def run_page(page: str, speech_wav: typing.Union[str, pathlib.Path], until: typing.Callable[[], typing.Any], seconds: float = 90.0):
    """Headless Chromium on `page` with a fake microphone playing `speech_wav` (48 kHz WAV, looped), until
    `until()` gives a truthy value (polled twice a second) or `seconds` pass; returns its last value."""
    profile = tempfile.mkdtemp()
    # the page is never in front of anyone: without the three --disable-back... flags (puppeteer's defaults too)
    # Chromium may throttle its timers and stop painting it, and the video frame callbacks that count the
    # frames drawn stop with the painting
    command = [browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
               "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={speech_wav}",
               "--autoplay-policy=no-user-gesture-required", "--disable-background-timer-throttling",
               "--disable-backgrounding-occluded-windows", "--disable-renderer-backgrounding", f"--user-data-dir={profile}", page]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, result = time.time() + seconds, None
        while time.time() < deadline:
            time.sleep(0.5)
            result = until()
            if result:
                break
        return result
    finally:
        process.terminate()
        process.wait(20)
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--renderer", choices=RENDERERS, default=RealtimeConfig().pipeline.renderer)
    parser.add_argument("--transport", choices=("webrtc", "ws"), default="webrtc")
    args = parser.parse_args(argv)
    if browser() is None:
        raise SystemExit("error: no chromium on PATH (apt-get install chromium)")
    from realtime.engine import Engine
    from realtime.server import AvatarServer, BackgroundServer

    config = dataclasses.replace(RealtimeConfig(), pipeline=dataclasses.replace(RealtimeConfig().pipeline, renderer=args.renderer))
    engine = Engine(config=config, idle_config=IdleConfig())
    with tempfile.TemporaryDirectory() as tmp, \
            BackgroundServer(AvatarServer(engine, media.read_image(DATA / "faces/ageitgey__face_recognition/obama.jpg"), config)) as server:
        wav = pathlib.Path(tmp) / "mic.wav"
        media.write_audio(wav, media.read_audio(SPEECH, 48000), 48000)
        print(f"{args.transport}, {args.renderer} renderer, one session, {args.seconds:g} s")
        print(f"{'s':>4} {'first frame':>11} {'server p50':>10} {'p95':>5} {'video buf':>9} {'audio buf':>9} {'decode':>6} "
              f"{'A/V':>5} {'shown':>6} {'distinct':>8} {'repeated':>8} {'voice behind':>12}")
        started, last, offsets = time.time(), [0.0], []  # offsets: (s, A/V offset as played, ms)
        number = lambda value, digits=0: "-" if value is None else f"{value:.{digits}f}"

        def report():
            now = time.time() - started
            clients = server.server.stats()["clients"]
            if clients and now - last[0] >= 1.0:
                last[0] = now
                stats = clients[0]
                page = stats["client"]
                print(f"{now:4.0f} {number(page.get('first_frame_ms')):>11} {number(stats['latency_p50_ms']):>10} "
                      f"{number(stats['latency_p95_ms']):>5} {number(page.get('video_jitter_buffer_ms')):>9} "
                      f"{number(page.get('audio_jitter_buffer_ms')):>9} {number(page.get('decode_ms'), 1):>6} "
                      f"{number(page.get('av_offset_ms')):>5} {page.get('decoded', 0):>6} {page.get('distinct', 0):>8} "
                      f"{stats['dropped']:>8} {number(stats['voice_behind_p95_ms']):>12}", flush=True)
                if page.get("av_offset_ms") is not None:
                    offsets.append((now, page["av_offset_ms"]))
            return now > args.seconds

        page = server.page + "&autostart=1" + ("&transport=ws" if args.transport == "ws" else "")
        run_page(page, wav, report, args.seconds + 30)
    if args.transport == "webrtc":
        print(av_summary(offsets, 1000 / config.fps))


def av_summary(offsets: typing.Sequence[typing.Tuple[float, float]], frame_ms: float) -> str:
    """One line on the A/V offset as played: `offsets` (seconds since the start, offset in ms), one a report.
    Settled: from the first report after which every offset stayed within one frame."""
    if not offsets:
        return "A/V offset as played: no report"
    settled = next((k for k in range(len(offsets)) if all(abs(x) <= frame_ms for _, x in offsets[k:])), None)
    tail = [abs(x) for _, x in offsets[-10:]]
    return (f"A/V offset as played: last {len(tail)} reports median |offset| {sorted(tail)[len(tail) // 2]:.0f} ms, "
            f"max {max(tail):.0f} ms; " + (f"within one frame ({frame_ms:.0f} ms) from {offsets[settled][0]:.0f} s on"
                                          if settled is not None else f"not settled within one frame ({frame_ms:.0f} ms)"))


if __name__ == "__main__":
    main()
