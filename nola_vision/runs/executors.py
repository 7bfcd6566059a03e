"""Where ``protocol`` and ``tune`` runs execute: local subprocesses (``--jobs N``) or SLURM job arrays (submitit).

A run is a command line and a log file; an executor runs a batch of them and yields each with its exit code
as it finishes. Runs write their own results atomically, so an executor only has to start them and report.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

__all__ = ["Executor", "LocalExecutor", "Run", "SubmititExecutor", "add_executor_arguments", "build_executor",
           "call", "stop_runs_on_sigterm"]


@dataclass(frozen=True)
class Run:
    """One ``nola-vision fit`` process: its command line and the file that receives its output."""

    cmd: Tuple[str, ...]
    log: Path


_RUNNING: Set[subprocess.Popen] = set()  # the fits this process started and waits for
_RUNNING_LOCK = threading.Lock()


def call(cmd: Sequence[str], log: str, env: Optional[Dict[str, str]] = None) -> Tuple[int, float]:
    """Run ``cmd`` with its output in ``log`` (after the command line); return its exit code and wall seconds."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        process = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env)
        with _RUNNING_LOCK:
            _RUNNING.add(process)
        try:
            code = process.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(process)
    return code, round(time.time() - start, 1)


def stop_runs_on_sigterm() -> None:
    """On SIGTERM (``kill``, a scheduler's cancel), stop the fits this process started, then exit: left running,
    they would hold their devices and race a re-run for the same folders."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: object) -> None:
        with _RUNNING_LOCK:
            running = list(_RUNNING)
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


class Executor:
    """Runs batches of :class:`Run`; ``capacity`` is how many may run at once (callers size their threads by it)."""

    capacity: int = 1

    def run(self, runs: Sequence[Run]) -> Iterator[Tuple[Run, int, float]]:
        """Start every run; yield ``(run, exit code, wall seconds)`` as each finishes."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """Up to ``jobs`` subprocesses at once on this machine, shared by every caller (thread-safe).

    With CUDA, each job slot gets its own ``CUDA_VISIBLE_DEVICES`` (``gpus_per_job`` devices, round-robin over the
    visible ones), so ``--jobs 4`` on a 4-GPU machine runs one run per GPU; ``gpus_per_job=0`` runs every job on
    the CPU. More than the visible devices is refused: a slot would list one device twice.
    """

    def __init__(self, jobs: int = 1, gpus_per_job: Optional[int] = None, devices: Optional[List[str]] = None) -> None:
        if jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {jobs}")
        self.capacity = jobs
        devices = _visible_devices() if devices is None else devices
        if gpus_per_job is not None and not 0 <= gpus_per_job <= len(devices):
            visible = f"the {len(devices)} visible CUDA devices ({','.join(devices)})" if devices else "0 (no GPU)"
            raise ValueError(f"--gpus_per_job must be between 0 (jobs on the CPU) and {visible}, got {gpus_per_job}")
        gpus = (1 if devices else 0) if gpus_per_job is None else gpus_per_job
        self.slot_devices: List[Optional[str]] = [
            ",".join(devices[(slot * gpus + g) % len(devices)] for g in range(gpus)) if devices else None
            for slot in range(jobs)]
        self._free = list(range(jobs))
        self._lock = threading.Condition()

    def _call(self, run: Run) -> Tuple[int, float]:
        with self._lock:
            self._lock.wait_for(lambda: bool(self._free))
            slot = self._free.pop(0)
        try:
            env = None
            if self.slot_devices[slot] is not None:
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": self.slot_devices[slot]}
            return call(run.cmd, str(run.log), env)
        finally:
            with self._lock:
                self._free.append(slot)
                self._lock.notify()

    def run(self, runs: Sequence[Run]) -> Iterator[Tuple[Run, int, float]]:
        if not runs:
            return
        with ThreadPoolExecutor(max_workers=min(len(runs), self.capacity)) as pool:
            futures = {pool.submit(self._call, run): run for run in runs}
            for future in as_completed(futures):
                yield (futures[future], *future.result())


def _visible_devices() -> List[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


class SubmititExecutor(Executor):
    """Each batch is one submitit job array: ``cluster="slurm"`` on a SLURM cluster, ``"local"`` for testing.

    ``jobs`` caps how many array tasks run at once (``slurm_array_parallelism``). The runs' command lines
    use this Python, so the cluster nodes must see the same environment (a shared filesystem).
    """

    def __init__(self, folder: str, cluster: str = "slurm", jobs: int = 64, partition: Optional[str] = None,
                 time_min: int = 60, gpus_per_node: int = 1, cpus_per_task: int = 4, poll_s: float = 1.0) -> None:
        import submitit

        self.capacity, self.poll_s = jobs, poll_s
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        params = {"timeout_min": time_min, "gpus_per_node": gpus_per_node, "cpus_per_task": cpus_per_task,
                  "name": "nola-vision"}
        if cluster == "slurm":
            params["slurm_array_parallelism"] = jobs
            if partition:
                params["slurm_partition"] = partition
        self.executor.update_parameters(**params)

    def run(self, runs: Sequence[Run]) -> Iterator[Tuple[Run, int, float]]:
        if not runs:
            return
        jobs = self.executor.map_array(call, [list(r.cmd) for r in runs], [str(r.log) for r in runs])
        pending = dict(zip(jobs, runs))
        while pending:
            for job in [j for j in pending if j.done()]:
                run = pending.pop(job)
                try:
                    code, wall = job.result()
                except Exception as err:  # the job itself failed (time limit, node failure): report, do not count
                    with open(run.log, "a") as f:
                        f.write(f"\nsubmitit job {job.job_id} failed: {err}\n")
                    code, wall = -1, 0.0
                yield run, code, wall
            if pending:
                time.sleep(self.poll_s)


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--jobs``/``--executor``/``--slurm_*`` options shared by ``protocol`` and ``tune``."""
    group = parser.add_argument_group("where runs execute")
    group.add_argument("--executor", choices=["local", "slurm", "submitit_local"], default="local",
                       help="local: subprocesses on this machine; slurm: submitit job arrays; "
                            "submitit_local: submitit's local executor (for testing the SLURM path)")
    group.add_argument("--jobs", type=int, default=1,
                       help="runs at once (local: processes on this machine; slurm: array parallelism)")
    group.add_argument("--gpus_per_job", type=int, default=None,
                       help="local with CUDA: GPUs per job slot via CUDA_VISIBLE_DEVICES (default 1; 0: on the CPU)")
    group.add_argument("--slurm_partition", default=None)
    group.add_argument("--slurm_time", type=int, default=60, help="time limit per run, in minutes")
    group.add_argument("--slurm_gpus_per_node", type=int, default=1)
    group.add_argument("--slurm_cpus_per_task", type=int, default=4)
    group.add_argument("--slurm_folder", default=None, help="submitit logs (default <out>/<name>/submitit)")


def build_executor(args: argparse.Namespace, default_folder: Path) -> Executor:
    """The executor chosen by :func:`add_executor_arguments`' options."""
    if args.executor == "local":
        return LocalExecutor(args.jobs, args.gpus_per_job)
    cluster = "slurm" if args.executor == "slurm" else "local"
    gpus = args.slurm_gpus_per_node if cluster == "slurm" else min(args.slurm_gpus_per_node, len(_visible_devices()))
    return SubmititExecutor(str(args.slurm_folder or default_folder), cluster, args.jobs, args.slurm_partition,
                            args.slurm_time, gpus, args.slurm_cpus_per_task)
