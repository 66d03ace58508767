"""Benchmarks: each module prints its figures as a table; `--out` also writes them as JSON (`write_rows`)."""

import json
import pathlib
import typing


def write_rows(path: typing.Optional[pathlib.Path], rows: typing.Sequence[typing.Mapping[str, typing.Any]]) -> None:
    """The benchmark's rows as JSON at `path` (`--out`), saying where; nothing when `path` is None."""
    if path is not None:
        path.write_text(json.dumps(list(rows), indent=1))
        print(f"wrote {path}")
