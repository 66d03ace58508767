"""`avatar batch` on a local Ray (2 CPUs): a bad job fails alone, a killed worker's job is retried,
a rerun skips what is done, a changed input runs again."""

import asyncio
import csv
import json
import shutil
import subprocess
import sys
import threading

import pytest

from avatar import media
from conftest import DATA, GRID_CLIP, LRS2_CLIP, PORTRAIT, REPO

SPEECH = DATA / "speech/kleinlee__DH_live/audio0.wav"
pytest.importorskip("ray")
from avatar.batch import Worker  # noqa: E402  (after the skip: it needs no Ray, the tests do)


def batch(*args):
    return subprocess.run([sys.executable, "-m", "avatar.cli", "batch", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture
def folder(tmp_path):
    shutil.copy(LRS2_CLIP, tmp_path / "clip.mp4")
    speech = media.read_audio(SPEECH)
    media.write_audio(tmp_path / "hello.wav", speech[:16000 * 2])
    media.write_audio(tmp_path / "again.wav", speech[16000 * 2:16000 * 4])
    return tmp_path


def table(out):
    with open(out / "results.csv") as handle:
        return {row["job"]: row for row in csv.DictReader(handle)}


def test_a_bad_job_fails_alone_a_rerun_skips_and_a_changed_input_runs_again(folder):
    (folder / "jobs.csv").write_text("video,image,audio,output\n"
                                     "clip.mp4,,hello.wav,dubbed.mp4\n"
                                     f",{PORTRAIT},again.wav,talking.mp4\n"
                                     ",no_such_face.jpg,hello.wav,broken.mp4\n")
    out = folder / "out"
    first = batch(folder / "jobs.csv", "--output-dir", out, "--quiet", "--cpus", 2, "--workers", 3)  # more workers than CPUs
    assert first.returncode == 1, first.stderr
    assert "failed: broken.mp4: " in first.stdout and "no such file" in first.stdout and "Traceback" not in first.stderr
    rows = table(out)
    assert [rows[name]["status"] for name in ("dubbed.mp4", "talking.mp4", "broken.mp4")] == ["done", "done", "failed"]
    assert sorted(p.name for p in out.iterdir()) == ["dubbed.mp4", "dubbed.mp4.provenance.json", "results.csv", "results.json",
                                                     "talking.mp4", "talking.mp4.provenance.json"]
    assert rows["dubbed.mp4"]["output_sha256"] and float(rows["dubbed.mp4"]["real_time_factor"]) > 0
    assert json.loads((out / "results.json").read_text())[2]["error"].endswith("no such file; check the path")
    made = {name: (out / name).stat().st_mtime_ns for name in ("dubbed.mp4", "talking.mp4")}

    (folder / "jobs.csv").write_text("video,image,audio,output\nclip.mp4,,hello.wav,dubbed.mp4\n"
                                     f",{PORTRAIT},again.wav,talking.mp4\n")
    rerun = batch(folder / "jobs.csv", "--output-dir", out, "--quiet")
    assert rerun.returncode == 0 and "2 jobs: 0 done, 2 skipped, 0 failed" in rerun.stdout, rerun.stdout + rerun.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in made} == made  # nothing was written again

    media.write_audio(folder / "again.wav", media.read_audio(SPEECH)[16000 * 4:16000 * 6])  # new speech for one job
    changed = batch(folder / "jobs.csv", "--output-dir", out, "--quiet", "--cpus", 2)
    assert changed.returncode == 0 and "1 done, 1 skipped" in changed.stdout, changed.stdout + changed.stderr
    assert (out / "dubbed.mp4").stat().st_mtime_ns == made["dubbed.mp4"]
    assert (out / "talking.mp4").stat().st_mtime_ns != made["talking.mp4"]


def test_a_worker_holding_two_jobs_keeps_each_job_s_own_video_and_speech(folder):
    """One worker with 2 CPUs holds both jobs (the second's tracking beside the first's rendering):
    each output shows its own video, for its own speech's length."""
    shutil.copy(GRID_CLIP, folder / "grid.mpg")
    media.write_audio(folder / "longer.wav", media.read_audio(SPEECH)[:16000 * 3])
    (folder / "jobs.csv").write_text("video,audio,output\nclip.mp4,hello.wav,lrs2.mp4\ngrid.mpg,longer.wav,grid.mp4\n")
    out = folder / "out"
    result = batch(folder / "jobs.csv", "--output-dir", out, "--quiet", "--cpus", 2, "--workers", 1)
    assert result.returncode == 0 and "2 jobs: 2 done" in result.stdout, result.stdout + result.stderr
    for name, source, seconds in (("lrs2.mp4", folder / "clip.mp4", 2), ("grid.mp4", folder / "grid.mpg", 3)):
        made = media.read_video(out / name, with_audio=False).frames
        first = media.read_video(source, with_audio=False, max_frames=1).frames[0]
        assert made.shape[1:] == first.shape and abs(len(made) - 25 * seconds) <= 1, (name, made.shape)


class _Writing:
    """A Ray actor the stalling worker tells when it is writing (the test waits on it: no polling)."""

    def __init__(self):
        self.event, self.claimed = asyncio.Event(), False

    async def claim(self) -> bool:
        """True once: the first job to ask stalls, its retry does not."""
        first, self.claimed = not self.claimed, True
        return first

    async def writing(self) -> None:
        self.event.set()

    async def wait(self) -> None:
        await self.event.wait()


class _StallingWorker(Worker):
    """The real worker, whose first job stops after writing 10 frames of its output and waits there
    (for ever) after saying so: the test kills it at that point."""

    def _pipeline(self, renderer):
        import ray

        pipeline = super()._pipeline(renderer)
        write = pipeline._write
        signal = ray.get_actor("writing")

        def stalling(output, fps, samples, inputs, frames, *args, **kwargs):
            def frames_then_stall():
                for index, frame in enumerate(frames):
                    if index == 10 and ray.get(signal.claim.remote()):
                        ray.get(signal.writing.remote())
                        threading.Event().wait()  # until the process is killed
                    yield frame
            write(output, fps, samples, inputs, frames_then_stall(), *args, **kwargs)

        pipeline._write = stalling
        return pipeline


def test_a_killed_worker_s_job_is_retried_and_leaves_no_partial_file(folder):
    """The worker is killed (`ray.kill`) while it writes the job's output (it has said so, and waits);
    Ray restarts it and the job is run again, to the end; what the dead process left half-written
    is gone."""
    import ray

    from avatar.batch import read_jobs, run
    from avatar.config import BatchConfig

    media.write_audio(folder / "long.wav", media.read_audio(SPEECH)[:16000 * 5])
    (folder / "jobs.jsonl").write_text(json.dumps({"video": "clip.mp4", "audio": "long.wav", "output": "dubbed.mp4"}) + "\n")
    out = folder / "out"
    out.mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    try:
        signal = ray.remote(_Writing).options(name="writing", num_cpus=0).remote()
        partial = []

        def kill_while_writing(job, actor):
            def kill():
                ray.get(signal.wait.remote())  # the job has written part of its output and stopped there
                partial.extend(out.glob(".dubbed.*.tmp*"))
                ray.kill(actor, no_restart=False)

            if not partial:
                threading.Thread(target=kill, daemon=True).start()

        rows = run(read_jobs(folder / "jobs.jsonl"), out, BatchConfig(workers=1), progress=False,
                   on_submit=kill_while_writing, worker=_StallingWorker)
    finally:
        ray.shutdown()
    assert partial, "the job was not writing when its worker was killed"
    assert rows[0]["status"] == "done" and rows[0]["attempts"] == 2, rows
    assert sorted(p.name for p in out.iterdir()) == ["dubbed.mp4", "dubbed.mp4.provenance.json", "results.csv", "results.json"]
    assert len(media.read_video(out / "dubbed.mp4", with_audio=False).frames) == 125


def test_malformed_jobs_files_get_one_line(folder):
    cases = [
        ("jobs.txt", "x", "jobs come as .csv (with a header) or .jsonl"),
        ("jobs.csv", "video,sound,output\nclip.mp4,hello.wav,o.mp4\n", "unknown column(s) sound"),
        ("jobs.csv", "video,audio\nclip.mp4,hello.wav\n", "a job needs audio and output"),
        ("jobs.csv", "video,image,audio,output\nclip.mp4,x.jpg,hello.wav,o.mp4\n", "one of video and image"),
        ("jobs.csv", "video,audio,output\nclip.mp4,hello.wav,../o.mp4\n", "must be a name inside the output folder"),
        ("jobs.csv", "video,audio,output\nclip.mp4,hello.wav,o.mp4\nclip.mp4,again.wav,o.mp4\n", "is also line 2's"),
        ("jobs.jsonl", "[1]\n", "a job must be a JSON object, not list"),
        ("jobs.jsonl", "{bad\n", "not a JSON object"),
    ]
    for name, text, words in cases:
        (folder / name).write_text(text)
        result = batch(folder / name, "--output-dir", folder / "out")
        assert result.returncode == 2 and words in result.stderr and result.stderr.count("\n") == 1, (name, text, result.stderr)
        assert not (folder / "out").exists()
