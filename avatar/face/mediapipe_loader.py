"""Import mediapipe's face-mesh and face-detection solutions (mediapipe 0.10.21 bundles their models).

mediapipe's C++ bindings print a harmless `'MessageFactory' object has no attribute 'GetPrototype'`
line on import with protobuf 6 (see ENVIRONMENT.md), and glog/TFLite print INFO/WARNING lines when a
graph starts. Both would look like failures to a user, so the import runs with the process's stderr
captured; if the import fails for real, what was captured is shown in the error.

mediapipe's solutions also import matplotlib's pyplot, for a 3-D plotting helper the engine never
calls: half of mediapipe's import time (0.55 of 1.05 s measured on a 2-core machine). During the
import, `matplotlib` and `matplotlib.pyplot` are stand-ins that import the real modules on first use
(`ImportedOnUse`); afterwards they leave `sys.modules`, so other code that imports matplotlib gets the
real one.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
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


class ImportedOnUse(types.ModuleType):
    """Stands in for a module under its name; the real module is imported when an attribute is first
    read, and the attribute comes from it (dunder names, which the import machinery asks, raise)."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


@contextlib.contextmanager
def pyplot_imported_on_use() -> typing.Iterator[None]:
    """For the block, `import matplotlib.pyplot` gives an `ImportedOnUse` stand-in (nothing happens if
    matplotlib is imported already)."""
    names = ("matplotlib", "matplotlib.pyplot")
    if any(name in sys.modules for name in names):
        yield
        return
    stand_ins = {name: ImportedOnUse(name) for name in names}
    stand_ins["matplotlib"].__path__ = []  # a package
    stand_ins["matplotlib"].pyplot = stand_ins["matplotlib.pyplot"]  # what `import matplotlib.pyplot as plt` reads
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def import_face_mesh() -> typing.Tuple[types.ModuleType, types.ModuleType]:
    """Return `(face_mesh, face_detection)` solution modules, importing them once."""
    global _MODULES
    if _MODULES is None:
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with quiet_stderr() as captured, pyplot_imported_on_use():
            try:
                from mediapipe.python.solutions import face_detection, face_mesh
            except ImportError as exc:
                detail = "".join(captured).strip().splitlines()[-1:] or [""]
                raise ImportError(f"mediapipe face mesh is unavailable ({exc}; {detail[0]}); run `make install`") from exc
        _MODULES = (face_mesh, face_detection)
    return _MODULES
