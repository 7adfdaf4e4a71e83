"""examples/normistral_11b/train_slurm.sbatch itself, run with bash under fake SLURM tools
(tests/launch/fake_slurm: srun, scontrol, sbatch) and fake SLURM variables for one node.

Fast cases: the fake srun records its options, command, working directory and environment and
exits (FAKE_SRUN_RECORD_ONLY=1); the test reads what the script would have launched.
The slow case trains the tiny model through srun -> torchrun_node.sh -> torchrun -> 2 CPU
workers and sends SIGUSR1 as SLURM does 10 minutes before a job's end.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from megatron_normistral.testing.tiny_run import REPO, prepare_tiny_data, read_log, tiny_recipe

EXAMPLES = REPO / "examples" / "normistral_11b"
SBATCH_SCRIPT = EXAMPLES / "train_slurm.sbatch"
FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm"
TAG = "NORMISTRAL_LAUNCH_TEST"  # marks every process a test starts, orphans included


class Job:
    """One run of the batch script: fake SLURM on PATH, a record folder, a process tag."""

    def __init__(self, tmp_path: Path, gpu_env: dict[str, str] | None = None, record_only: bool = True,
                 tres_per_node: str | None = None, **extra_env: str):
        self.record = tmp_path / f"record-{uuid.uuid4().hex[:8]}"
        self.record.mkdir()
        bin_dir = tmp_path / "bin"
        if not bin_dir.exists():  # copies, so that the executable bits do not depend on the checkout
            bin_dir.mkdir()
            for tool in FAKE_SLURM.iterdir():
                shutil.copy(tool, bin_dir / tool.name)
                (bin_dir / tool.name).chmod(0o755)
        self.tag = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_", "NORMISTRAL_"))}
        env.update(
            PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            SLURM_JOB_NODELIST="gpu-node-[001]", SLURM_NNODES="1", SLURM_JOB_ID="4242",
            SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="2", FAKE_SLURM_RECORD=str(self.record),
            # One node: port 0 lets torchrun's rendezvous store bind any free port itself (as
            # --standalone does); a port picked here could be taken by the time torchrun binds it.
            MASTER_PORT="0", PYTHONUNBUFFERED="1", **{TAG: self.tag},
        )
        env.update(gpu_env if gpu_env is not None else {"SLURM_GPUS_PER_NODE": "2"})
        if record_only:
            env["FAKE_SRUN_RECORD_ONLY"] = "1"
        if tres_per_node:
            env["FAKE_SCONTROL_TRES_PER_NODE"] = tres_per_node
        env.update(extra_env)
        self.env = env
        self.output = tmp_path / f"job-{self.tag[:8]}.out"
        self.proc: subprocess.Popen | None = None

    def start(self, *args: str, cwd: Path = REPO) -> "Job":
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen(["bash", str(SBATCH_SCRIPT), *args], cwd=cwd, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout=timeout)

    def run(self, *args: str, cwd: Path = REPO, timeout: float = 60) -> int:
        return self.start(*args, cwd=cwd).wait(timeout)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def recorded(self, name: str) -> list[str]:
        return [item for item in (self.record / name).read_bytes().decode().split("\0") if item]

    def srun_command(self) -> list[str]:
        return self.recorded("srun-command")

    def srun_env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.recorded("srun-env"))

    def processes(self) -> list[int]:
        """Live processes carrying this job's tag (the batch shell and everything it started)."""
        needle = f"{TAG}={self.tag}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if needle in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass  # gone, or a zombie
        return found

    def step_processes(self) -> list[int]:
        """What a SLURM job step holds: everything tagged except the batch shell."""
        return [pid for pid in self.processes() if pid != self.proc.pid]

    def kill_all(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def worker_command(command: list[str]) -> list[str]:
    """The per-GPU command torchrun is given (after --no-python)."""
    return command[command.index("--no-python") + 1:]


# --- fast cases: what the script launches -----------------------------------------------------

@pytest.mark.parametrize(
    ("gpu_env", "tres_per_node", "expected"),
    [
        ({"SLURM_GPUS_PER_NODE": "8"}, None, "8"),
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, None, "8"),  # --gpus-per-node=a100:8
        ({"SLURM_GPUS_PER_NODE": "a100:4,h100:4"}, None, "8"),
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1,2,3"}, None, "4"),  # --gres=gpu:4
        ({}, "gres/gpu:8", "8"),  # --gres=gpu:8 without SLURM_GPUS_ON_NODE (Slurm >= 23)
        ({}, "gres/gpu:a100:8", "8"),
        ({}, "gres:gpu:4", "4"),  # Slurm 21.08's spelling
    ],
    ids=["gpus-per-node", "gpus-per-node-typed", "gpus-per-node-two-types", "gpus-on-node", "gres", "gres-typed", "gres-old"],
)
def test_gpu_count_per_node(gpu_env, tres_per_node, expected, tmp_path):
    job = Job(tmp_path, gpu_env=gpu_env, tres_per_node=tres_per_node)
    assert job.run("stage3_full.yaml") == 0, job.text()
    command = job.srun_command()
    assert option(command, "--nproc-per-node") == expected
    assert command[:3] == ["bash", "examples/normistral_11b/torchrun_node.sh", "node"] and command[3] == expected


@pytest.mark.parametrize(("gpu_env", "tres_per_node"), [({}, None), ({"SLURM_GPUS_PER_NODE": "a100"}, None), ({}, "gres/nic:1")],
                         ids=["none", "untyped-count-missing", "gres-without-gpu"])
def test_no_gpu_count_is_one_line_error(gpu_env, tres_per_node, tmp_path):
    job = Job(tmp_path, gpu_env=gpu_env, tres_per_node=tres_per_node)
    assert job.run("stage3_full.yaml") == 2
    lines = job.text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_slurm.sbatch: error: no GPU count per node"), lines
    assert "--gpus-per-node=N" in lines[0] and "--gres=gpu:N" in lines[0]
    assert not (job.record / "srun-command").exists()


def test_launch_options(tmp_path):
    job = Job(tmp_path)
    assert job.run("stage3_full.yaml", "--train-iters", "7") == 0, job.text()
    command = job.srun_command()
    assert job.recorded("srun-options") == ["--kill-on-bad-exit=1"]
    assert job.srun_env()["SRUN_CPUS_PER_TASK"] == "2"  # Slurm 22.05-23.02 ignore SLURM_CPUS_PER_TASK in srun
    handled = option(command, "--signals-to-handle").split(",")
    assert {"SIGUSR1", "SIGTERM"} <= set(handled)
    assert option(command, "--shutdown-timeout") == "420"
    assert option(command, "--rdzv-endpoint") == "localhost:0"  # scontrol show hostnames' first, MASTER_PORT
    assert option(command, "--rdzv-id") == "4242" and option(command, "--nnodes") == "1"
    assert worker_command(command)[:3] == ["bash", "examples/normistral_11b/torchrun_node.sh", "worker"]
    assert worker_command(command)[-4:] == ["--config", "examples/normistral_11b/stage3_full.yaml", "--train-iters", "7"]

    longer = Job(tmp_path, SHUTDOWN_TIMEOUT="900")
    assert longer.run("stage3_full.yaml") == 0
    assert option(longer.srun_command(), "--shutdown-timeout") == "900"


def test_signal_lead_time_exceeds_shutdown_timeout():
    """sbatch reads #SBATCH lines up to the first command; --signal's lead must exceed the
    time torchrun waits for the save, or SLURM's time limit kills the save."""
    text = SBATCH_SCRIPT.read_text()
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines[:first_command] if line.startswith("#SBATCH")]
    assert not [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    lead = int(re.search(r"--signal=USR1@(\d+)", "\n".join(directives)).group(1))
    timeout = int(re.search(r"SHUTDOWN_TIMEOUT=\$\{SHUTDOWN_TIMEOUT:-(\d+)\}", text).group(1))
    assert lead > timeout + 60, (lead, timeout)


def test_runs_from_repository_root_whatever_the_cwd(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "my").mkdir(parents=True)
    # Submitted from the repository root, started in another directory: the job cds to the root.
    job = Job(tmp_path)
    assert job.run("stage3_full.yaml", cwd=elsewhere) == 0, job.text()
    assert Path(job.recorded("srun-cwd")[0].strip()) == REPO
    config = option(worker_command(job.srun_command()), "--config")
    assert config == "examples/normistral_11b/stage3_full.yaml" and (REPO / config).is_file()

    # Submitted from elsewhere with NORMISTRAL_ROOT (submit_slurm.sh): a recipe path is relative
    # to the submit directory.
    (elsewhere / "my" / "recipe.yaml").write_text("training: {train_iters: 3}\n")
    job = Job(tmp_path, SLURM_SUBMIT_DIR=str(elsewhere), NORMISTRAL_ROOT=str(REPO))
    assert job.run("my/recipe.yaml", cwd=elsewhere) == 0, job.text()
    assert Path(job.recorded("srun-cwd")[0].strip()) == REPO
    assert option(worker_command(job.srun_command()), "--config") == str(elsewhere / "my" / "recipe.yaml")

    # Submitted from elsewhere without it: one line saying what to do, nothing launched.
    job = Job(tmp_path, SLURM_SUBMIT_DIR=str(elsewhere))
    assert job.run("stage3_full.yaml", cwd=elsewhere) == 2
    lines = job.text().strip().splitlines()
    assert len(lines) == 1 and "is not the repository root" in lines[0] and "NORMISTRAL_ROOT" in lines[0], lines
    job = Job(tmp_path)
    assert job.run("missing.yaml") == 2 and "recipe examples/normistral_11b/missing.yaml not found" in job.text()
    assert not (job.record / "srun-command").exists()


def test_submit_wrapper_creates_logs_folder(tmp_path):
    """submit_slurm.sh in a copy of the repository layout (so that logs/ is not made in the checkout)."""
    root = tmp_path / "repo"
    (root / "examples" / "normistral_11b").mkdir(parents=True)
    for name in ("submit_slurm.sh", "train_slurm.sbatch", "torchrun_node.sh"):
        shutil.copy(EXAMPLES / name, root / "examples" / "normistral_11b" / name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    job = Job(tmp_path)
    out = subprocess.run(["bash", str(root / "examples/normistral_11b/submit_slurm.sh"), "--nodes", "2", "--", "stage3_full.yaml",
                          "--train-iters", "5"], cwd=elsewhere, env=job.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert (root / "logs").is_dir() and (job.record / "sbatch-output-folder-exists").read_text().strip() == "yes"
    assert job.recorded("sbatch-args") == [
        f"--output={root}/logs/%x-%j.out", f"--export=ALL,NORMISTRAL_ROOT={root}", "--nodes", "2",
        f"{root}/examples/normistral_11b/train_slurm.sbatch", "stage3_full.yaml", "--train-iters", "5",
    ]
    out = subprocess.run(["bash", str(root / "examples/normistral_11b/submit_slurm.sh"), "--nodes", "2", "--"], cwd=elsewhere,
                         env=job.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.startswith("submit_slurm.sh: error: no recipe")


def test_submit_wrapper_help_prints_its_usage_and_submits_nothing(tmp_path):
    job = Job(tmp_path)
    for flag in ("--help", "-h"):
        out = subprocess.run(["bash", str(EXAMPLES / "submit_slurm.sh"), flag], env=job.env, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("Submit train_slurm.sbatch from any directory:")
        assert "submit_slurm.sh [SBATCH_OPTION ...] -- RECIPE.yaml" in out.stdout and "set -euo" not in out.stdout
        assert not (job.record / "sbatch-args").exists()


# --- slow case: SIGUSR1 through the whole launcher ---------------------------------------------

def _steps(log: Path) -> list[dict]:
    return [r for r in read_log(log) if "eval" not in r] if log.exists() else []


def _wait_for_step(job: Job, log: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.proc.poll() is not None:
            pytest.fail(f"the job ended (rc {job.proc.returncode}) before step {step}:\n{job.text()[-4000:]}")
        records = _steps(log)
        if records and records[-1]["step"] >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {timeout} s:\n{job.text()[-4000:]}")


def _task_group(job: Job) -> int:
    """The process group of the task srun started (torchrun_node.sh node, torchrun in it)."""
    task = int(job.recorded("srun-task-pid")[0])
    assert os.getpgid(task) == task
    members = [pid for pid in job.step_processes() if _pgid(pid) == task]
    commands = [(Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")[:3] for pid in members]
    assert [b"-m", b"torch.distributed.run"] in [c[1:3] for c in commands], commands  # torchrun is in it
    return task


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _assert_stopped_cleanly(job: Job, ckpt: Path, after_step: int) -> int:
    """rc 0, a complete checkpoint of the step reached published as latest, nothing left running."""
    rc = job.wait(240)
    output = job.text()
    assert rc == 0, output[-6000:]
    step = int((ckpt / "latest").read_text().strip().split("_")[1])
    assert step > after_step, (step, after_step)
    assert f"stopping at step {step}: SIGUSR1" in output, output[-3000:]
    assert "all 2 workers stopped on it and exited 0" in output, output[-3000:]
    assert (ckpt / f"iter_{step:07d}" / "train_state.json").is_file()
    assert not list(ckpt.glob(".tmp-*")), list(ckpt.iterdir())
    deadline = time.monotonic() + 10
    while job.processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not job.processes(), f"left running: {job.processes()}"
    return step


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.mark.slow
def test_sigusr1_stops_saves_exits_0_and_resumes_exactly(data, tmp_path):
    """DP=2 on CPU (2 "GPUs"): an uninterrupted reference run; the same run stopped by SIGUSR1 to
    the process group of the task srun started (as SLURM signals a job step with proctrack/pgid:
    the node shell and torchrun, not the workers, which torchrun starts as session leaders); then
    resumed and stopped again by SIGUSR1 to every process of the step (proctrack/cgroup). Each
    stop follows a periodic save in the same process, as in a real job. The resumed steps must
    equal the uninterrupted run's bit for bit."""
    iters, save_every = 50, 3

    def recipe_file(name: str, **checkpoint) -> Path:
        recipe = tiny_recipe(data, tmp_path / name, training={"train_iters": iters}, checkpoint=checkpoint)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe.to_dict()))
        return path

    reference_yaml, stopped_yaml = recipe_file("reference"), recipe_file("stopped", save_interval=save_every)
    ckpt, log = tmp_path / "stopped" / "ckpt", tmp_path / "stopped" / "log.jsonl"
    jobs = []
    try:
        reference = Job(tmp_path, record_only=False)
        jobs.append(reference)
        assert reference.run(str(reference_yaml), timeout=300) == 0, reference.text()[-6000:]
        expected = {r["step"]: (r["loss"], r["grad_norm"]) for r in _steps(tmp_path / "reference" / "log.jsonl")}
        assert sorted(expected) == list(range(1, iters + 1))

        # 1. SIGUSR1 to the task's process group (torchrun, not its workers), after a periodic save.
        first = Job(tmp_path, record_only=False).start(str(stopped_yaml))
        jobs.append(first)
        _wait_for_step(first, log, save_every + 1)
        signalled_at = _steps(log)[-1]["step"]
        os.killpg(_task_group(first), signal.SIGUSR1)
        first_stop = _assert_stopped_cleanly(first, ckpt, signalled_at - 1)
        assert first_stop < iters

        # 2. Resumed from it; SIGUSR1 to every process of the step after a periodic save here.
        second = Job(tmp_path, record_only=False).start(str(stopped_yaml))
        jobs.append(second)
        _wait_for_step(second, log, (first_stop // save_every + 1) * save_every + 1)
        assert "resumed from" in second.text()
        signalled_at = _steps(log)[-1]["step"]
        for pid in second.step_processes():
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        second_stop = _assert_stopped_cleanly(second, ckpt, signalled_at - 1)
        assert second_stop < iters

        records = _steps(log)
        assert [r["step"] for r in records] == list(range(1, second_stop + 1))
        resumed = {r["step"]: (r["loss"], r["grad_norm"]) for r in records[first_stop:]}
        assert resumed == {step: expected[step] for step in resumed}, "resumed steps differ from the uninterrupted run"
    finally:
        for job in jobs:
            job.kill_all()
