"""Import mediapipe's face-mesh and face-detection solutions (mediapipe 0.10.21 bundles their models).

mediapipe's C++ bindings print a harmless `'MessageFactory' object has no attribute 'GetPrototype'`
line on import with protobuf 6 (see ENVIRONMENT.md), and glog/TFLite print INFO/WARNING lines when a
graph starts. Both would look like failures to a user, so the import runs with the process's stderr
captured; if the import fails for real, what was captured is shown in the error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
import typing

_MODULES: typing.Optional[typing.Tuple[types.ModuleType, types.ModuleType]] = None


@contextlib.contextmanager
def quiet_stderr() -> typing.Iterator[typing.List[str]]:
    """Redirect file descriptor 2 to a temp file for the block; yields a list filled with its text."""
    captured: typing.List[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def import_face_mesh() -> typing.Tuple[types.ModuleType, types.ModuleType]:
    """Return `(face_mesh, face_detection)` solution modules, importing them once."""
    global _MODULES
    if _MODULES is None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with quiet_stderr() as captured:
            try:
                from mediapipe.python.solutions import face_detection, face_mesh
            except ImportError as exc:
                detail = "".join(captured).strip().splitlines()[-1:] or [""]
                raise ImportError(f"mediapipe face mesh is unavailable ({exc}; {detail[0]}); run `make install`") from exc
        _MODULES = (face_mesh, face_detection)
    return _MODULES
