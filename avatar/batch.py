"""`avatar batch`: many dubs (or animations) on Ray, each job alone, nothing lost, nothing done twice.

    jobs = read_jobs("jobs.csv")                                     # or .jsonl; one job a line
    table = run(jobs, "out/", BatchConfig(workers=2))                # → one row a job (also results.csv/.json)

A job: `video` (dub), `image` or `avatar` (animate; `avatar` with `video` dubs with that enrolled
person), `audio`, `output` (a name inside the output folder), and optionally `renderer`,
`audio_longer`, `audio_shorter`. Paths are relative to the jobs file.

Workers are Ray actors (`ray`, the `batch` extra) that load the models once and take many jobs, as
many workers as `workers`. Each holds `jobs_per_worker` jobs at once (by default 2 where a worker has
more than one CPU, else 1): their decoding and face tracking run side by side, their rendering one
at a time, so the next job's tracking overlaps the current one's rendering. Ray runs locally by default (`ray.init` with this machine's CPUs) and
joins a cluster with `address`. Guarantees:
- outputs are atomic (as every command's), so a file in the output folder is always complete;
- a worker that dies mid-job (killed, out of memory, a lost node) is restarted by Ray and its job is
  tried again, up to `retries` more times; what the dead process left half-written is removed;
- a job whose output exists and whose provenance sidecar records the same inputs (names and hashes)
  and the same models is skipped, so a rerun redoes only what changed;
- a bad job (no face, unreadable audio, ...) fails alone with its one-line error.
The results table (`results.csv` and `results.json` in the output folder): job, status (done,
skipped, failed), attempts, seconds (the job's own: not its wait for the worker's other job), real-time factor,
audio seconds, error, output sha256.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import pathlib
import time
import typing

from avatar import media
from avatar.config import BatchConfig
from avatar.errors import AvatarError, MediaError

PathLike = typing.Union[str, os.PathLike]
FIELDS = ("video", "image", "avatar", "audio", "output", "renderer", "audio_longer", "audio_shorter")
PATHS = ("video", "image", "avatar", "audio")
RESULT_FIELDS = ("job", "status", "attempts", "seconds", "real_time_factor", "audio_seconds", "error", "output_sha256")


@dataclasses.dataclass(frozen=True)
class Job:
    """One line of the jobs file, its paths resolved."""

    line: int
    output: str
    audio: str
    video: typing.Optional[str] = None
    image: typing.Optional[str] = None
    avatar: typing.Optional[str] = None
    renderer: typing.Optional[str] = None
    audio_longer: typing.Optional[str] = None
    audio_shorter: typing.Optional[str] = None

    @property
    def inputs(self) -> typing.Dict[str, str]:
        """role → path, as the output's provenance sidecar records them."""
        return {role: getattr(self, role) for role in PATHS if getattr(self, role)}


def read_jobs(path: PathLike) -> typing.List[Job]:
    """A CSV (with a header line) or JSONL file → jobs; one-line errors naming the line for what is
    malformed in the file itself (a job whose inputs are bad fails later, alone)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such jobs file; give a .csv (with a header) or .jsonl file, one job a line")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except ValueError as exc:
                    raise MediaError(f"{path}:{number}: not a JSON object ({exc.msg}); one JSON object a line") from exc
                if not isinstance(value, dict):
                    raise MediaError(f"{path}:{number}: a job must be a JSON object, not {type(value).__name__}")
                rows.append((number, value))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        unknown = [name for name in reader.fieldnames or [] if name not in FIELDS]
        if unknown or not reader.fieldnames:
            raise MediaError(f"{path}:1: unknown column(s) {', '.join(unknown) or '(no header)'}; the columns are {', '.join(FIELDS)}")
        rows = [(number, {k: v for k, v in row.items() if v not in (None, "")}) for number, row in enumerate(reader, 2)]
    else:
        raise MediaError(f"{path}: jobs come as .csv (with a header) or .jsonl, not {path.suffix or 'no extension'}")
    jobs, outputs = [], {}
    for number, row in rows:
        where = f"{path}:{number}"
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise MediaError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
        if not row.get("audio") or not row.get("output"):
            raise MediaError(f"{where}: a job needs audio and output")
        if bool(row.get("video")) + bool(row.get("image")) != 1 and not (row.get("avatar") and not row.get("image")):
            raise MediaError(f"{where}: a job takes a video (dub) or an image or avatar (animate), one of video and image")
        output = pathlib.PurePath(str(row["output"]))
        if output.is_absolute() or ".." in output.parts:
            raise MediaError(f"{where}: output {row['output']} must be a name inside the output folder")
        if str(output) in outputs:
            raise MediaError(f"{where}: output {output} is also line {outputs[str(output)]}'s; give each job its own")
        outputs[str(output)] = number
        resolved = {k: str(path.parent / str(v)) if k in PATHS else str(v) for k, v in row.items()}
        resolved["output"] = str(output)
        jobs.append(Job(line=number, **resolved))
    if not jobs:
        raise MediaError(f"{path}: no jobs in it")
    return jobs


def _fingerprint(job: Job, output: pathlib.Path, models: pathlib.Path, hashes: typing.Dict[str, str]) -> bool:
    """Whether `output` is this job's finished work: it exists, its sidecar matches its bytes and
    records the same inputs (names and hashes) and the same model files (hashes) as now. `hashes`:
    the files hashed so far in this run (inputs shared by jobs and the models are read once)."""
    from avatar import provenance

    def sha256(path) -> str:
        if str(path) not in hashes:
            hashes[str(path)] = provenance.file_sha256(path)
        return hashes[str(path)]

    sidecar = provenance.sidecar_path(output)
    if not output.is_file() or not sidecar.is_file():
        return False
    try:
        record = json.loads(sidecar.read_text())
        if record.get("output_sha256") != provenance.file_sha256(output):
            return False
        recorded = record.get("inputs", {})
        if set(recorded) != set(job.inputs):
            return False
        for role, source in job.inputs.items():
            if not pathlib.Path(source).is_file() or recorded[role] != {"name": pathlib.Path(source).name, "sha256": sha256(source)}:
                return False
        return all((models / name).is_file() and digest == f"sha256:{sha256(models / name)}"
                   for name, digest in record.get("models", {}).items())
    except (ValueError, OSError, KeyError, AttributeError):
        return False


def remove_partials(output: pathlib.Path) -> None:
    """What a killed process left beside `output`: the temporary files of `media.atomic_output`
    (`.NAME.*.tmp.EXT`, the sidecar's and the signer's too)."""
    for leftover in output.parent.glob(f".{output.stem}.*.tmp*"):
        leftover.unlink(missing_ok=True)


class Worker:
    """A Ray actor: the models loaded once, many jobs. It may hold several jobs at once (Ray calls `run`
    from that many threads): their decoding and face tracking run side by side, their rendering one
    at a time, so the next job's tracking overlaps the current one's rendering."""

    def __init__(self, models: typing.Optional[str], threads: int):
        import threading

        self.models, self.threads = models, threads
        self.pipelines: typing.Dict[str, typing.Any] = {}
        self.loading, self.rendering = threading.Lock(), threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def _pipeline(self, renderer: typing.Optional[str]):
        from avatar.config import PipelineConfig
        from avatar.pipeline import AvatarPipeline

        key = renderer or PipelineConfig.renderer
        with self.loading:
            if key not in self.pipelines:
                config = PipelineConfig(renderer=key, threads=self.threads, workers=self.threads)
                self.pipelines[key] = AvatarPipeline.from_pretrained(self.models, config=config)
            return self.pipelines[key]

    def run(self, job: Job, output: str) -> typing.Dict[str, typing.Any]:
        """The job → its row (status done or failed, with the one-line error)."""
        from avatar.config import DubConfig
        from avatar.enroll import track_video

        started, waited = time.perf_counter(), [0.0]

        def rendered(make):
            """`make()` once this worker's other job has rendered (the wait is not this job's time)."""
            queued = time.perf_counter()
            with self.rendering:
                waited[0] = time.perf_counter() - queued
                return make()

        try:
            pipeline = self._pipeline(job.renderer)
            avatar = pipeline.load_avatar(job.avatar) if job.avatar else None
            if job.video:
                dub = DubConfig(**{k: getattr(job, k) for k in ("audio_longer", "audio_shorter") if getattr(job, k)})
                footage = track_video(pipeline, job.video, progress=False, with_audio=avatar is None)  # beside another job's rendering
                try:
                    result = rendered(lambda: pipeline.dub(job.video, job.audio, output, dub, progress=False, avatar=avatar,
                                                           footage=footage))
                finally:
                    footage.close()
            else:
                result = rendered(lambda: pipeline.animate(job.image, job.audio, output, progress=False, avatar=avatar))
        except (AvatarError, TypeError, ValueError) as exc:
            return {"status": "failed", "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    "seconds": time.perf_counter() - started - waited[0]}
        seconds = time.perf_counter() - started - waited[0]  # its own work: tracking and rendering, not the wait for the other job
        output_sha256 = json.loads(result.sidecar.read_text())["output_sha256"]  # hashed once, by the pipeline
        return {"status": "done", "seconds": seconds, "audio_seconds": result.audio_seconds,
                "real_time_factor": seconds / max(result.audio_seconds, 1e-9), "output_sha256": output_sha256}


def _row(job: Job, attempts: int, **values) -> typing.Dict[str, typing.Any]:
    row = {name: None for name in RESULT_FIELDS}
    row.update(job=job.output, attempts=attempts, **values)
    return row


def run(jobs: typing.Sequence[Job], output_dir: PathLike, config: BatchConfig = BatchConfig(), progress: bool = True,
        on_submit: typing.Optional[typing.Callable[[Job, typing.Any], None]] = None,
        worker: type = None) -> typing.List[typing.Dict[str, typing.Any]]:
    """Run `jobs` into `output_dir` on Ray (see the module docstring) → the results table, one row a
    job in the jobs' order, also written to `results.csv` and `results.json` there. `on_submit(job,
    actor)`: called when a job is handed to a worker; `worker`: the actor class (`Worker` or a
    subclass; tests give one that stops mid-job, to be killed there)."""
    import ray

    from avatar import provenance
    from avatar.runtime import ASSETS

    out = pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise MediaError(f"{out}: is a file, not a folder; give --output-dir a folder")
    out.mkdir(parents=True, exist_ok=True)
    models = pathlib.Path(config.models) if config.models else ASSETS
    rows: typing.Dict[int, typing.Dict[str, typing.Any]] = {}
    todo, hashes = [], {}
    for index, job in enumerate(jobs):
        if _fingerprint(job, out / job.output, models, hashes):
            record = json.loads(provenance.sidecar_path(out / job.output).read_text())
            rows[index] = _row(job, 0, status="skipped", output_sha256=record["output_sha256"])
        else:
            todo.append(index)
    seconds_of = {}
    for index in todo:
        try:
            seconds_of[index] = media.probe(jobs[index].audio).duration
        except AvatarError:
            seconds_of[index] = 0.0  # the job will fail with its own error
    if todo:
        started_here = not ray.is_initialized()
        if started_here:
            cpus = config.cpus or os.cpu_count() or 1
            ray.init(address=config.address or None, num_cpus=None if config.address else cpus, include_dashboard=False,
                     logging_level=logging.INFO if config.verbose else logging.ERROR, log_to_driver=config.verbose,
                     configure_logging=True)
        try:
            _run_on_ray(jobs, todo, out, config, models, rows, seconds_of, progress, on_submit, worker or Worker)
        finally:
            if started_here:
                ray.shutdown()
    table = [rows[index] for index in range(len(jobs))]
    write_table(table, out)
    return table


def _run_on_ray(jobs, todo, out, config, models, rows, seconds_of, progress, on_submit, worker) -> None:
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError
    from tqdm import tqdm

    cpus = ray.available_resources().get("CPU", 1.0)
    count = max(1, min(config.workers or max(1, int(cpus)), len(todo)))
    threads = max(1, int(cpus // count))
    held = config.jobs_per_worker or (2 if cpus / count > 1 else 1)
    # each worker reserves its share of the CPUs (a fraction when there are more workers than CPUs: all of them start)
    actor_class = ray.remote(worker).options(num_cpus=cpus / count, num_gpus=config.gpus_per_worker, max_restarts=-1,
                                             max_task_retries=0, max_concurrency=held)
    actors = [actor_class.remote(str(models), threads) for _ in range(count)]
    idle = [actor for _ in range(held) for actor in actors]  # a free place for a job, per worker
    queue = [(index, 1) for index in todo]
    running: typing.Dict[typing.Any, typing.Tuple[int, int, typing.Any, float]] = {}
    bar = tqdm(total=round(sum(seconds_of[i] for i in todo), 1), unit="audio s", desc="batch", disable=not progress)
    finished = 0
    try:
        while queue or running:
            while queue and idle:
                index, attempt = queue.pop(0)
                actor = idle.pop(0)
                target = out / jobs[index].output
                target.parent.mkdir(parents=True, exist_ok=True)
                running[actor.run.remote(jobs[index], str(target))] = (index, attempt, actor, time.perf_counter())
                if on_submit is not None:
                    on_submit(jobs[index], actor)
            done, _ = ray.wait(list(running), num_returns=1)
            index, attempt, actor, started = running.pop(done[0])
            job = jobs[index]
            try:
                result = ray.get(done[0])
            except (ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError) as exc:
                remove_partials(out / job.output)  # the dead process could not clean up
                _wait_restarted(actor)  # Ray restarts it (its models load again); a job given before then would fail too
                idle.append(actor)
                if attempt <= config.retries:
                    queue.insert(0, (index, attempt + 1))
                    continue
                result = {"status": "failed", "seconds": time.perf_counter() - started,
                          "error": f"its worker died {attempt} times ({type(exc).__name__})"}
            else:
                idle.append(actor)
            rows[index] = _row(job, attempt, **result)
            finished += 1
            bar.update(round(seconds_of[index], 1))
            bar.set_postfix_str(f"jobs {finished}/{len(todo)}" + (f", {sum(r['status'] == 'failed' for r in rows.values())} failed"
                                                                  if any(r["status"] == "failed" for r in rows.values()) else ""))
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


def _wait_restarted(actor, limit_s: float = 600.0) -> None:
    """Until Ray has restarted `actor` after its process died (it answers again), at most `limit_s`."""
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=30)
            return
        except (ActorUnavailableError, RayActorError, GetTimeoutError):
            time.sleep(0.2)


def write_table(table: typing.Sequence[typing.Dict[str, typing.Any]], out: pathlib.Path) -> None:
    """`results.csv` and `results.json` in `out` (atomically)."""
    with media.atomic_output(out / "results.json") as tmp:
        tmp.write_text(json.dumps(list(table), indent=1, default=float) + "\n")
    with media.atomic_output(out / "results.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
            writer.writeheader()
            for row in table:
                writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})
