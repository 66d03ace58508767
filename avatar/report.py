"""What a command reports: the result of a run (`RunResult`) and the seconds spent per stage (`StageClock`)."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import threading
import time
import typing


@dataclasses.dataclass
class RunResult:
    """What `animate` or `dub` made: the file, its length, the wall time and the report (`--report`
    JSON); `sidecar`: the provenance manifest beside the output."""

    output: pathlib.Path
    frames: int
    fps: float
    audio_seconds: float
    seconds: float
    report: typing.Dict[str, typing.Any]
    sidecar: typing.Optional[pathlib.Path] = None

    def summary(self) -> str:
        drift = self.report.get("drift", {})
        alarms = len(drift.get("alarms", [])) if drift else 0
        identity = drift.get("signals", {}).get("identity", {}).get("mean") if drift else None
        parts = [f"{self.frames} frames at {self.fps:g} fps ({self.frames / self.fps:.1f} s)",
                 f"{self.seconds:.1f} s ({self.seconds / max(self.audio_seconds, 1e-9):.1f}× the audio's length)"]
        if identity is not None:
            parts.append(f"identity distance {identity:.2f}, {alarms} drift alarm{'s' * (alarms != 1)}")
        return ", ".join(parts)


class StageClock:
    """Seconds spent per named stage."""

    def __init__(self):
        self.seconds: typing.Dict[str, float] = {}
        self._lock = threading.Lock()  # stages are timed on several threads (`AvatarPipeline.render_jobs`)

    @contextlib.contextmanager
    def time(self, stage: str) -> typing.Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed
