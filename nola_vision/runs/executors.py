"""Where ``protocol`` and ``tune`` runs execute: local subprocesses (``--jobs N``) or SLURM job arrays (submitit).

A run is a command line and a log file; an executor runs a batch of them and yields each with its exit code
as it finishes. Runs write their own results atomically, so an executor only has to start them and report.
A stop (SIGTERM or Ctrl-C, inside :func:`stop_runs_on_signals`) ends the command: the running fits are terminated,
no queued run starts (submitit jobs are cancelled), and it exits 143 or 130. The stop ends with the context, so a
process that goes on (a notebook, a test session) can start runs again.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from ..core.storage import try_lock

__all__ = ["CONFIG_EXIT", "DIVERGED_EXIT", "NOT_STARTED", "Executor", "LocalExecutor", "Run", "Stopped",
           "SubmititExecutor", "add_executor_arguments", "build_executor", "call", "claimed_job", "failure",
           "start_no_more", "stop_runs_on_signals", "stopping", "stopping_within"]

# The exit code of a fit that refused to run (its arguments or settings, its data, its folder): re-running it
# unchanged fails the same way until what its error names is fixed.
CONFIG_EXIT = 2
# The exit code of a fit whose training diverged (a NaN/Inf loss or weights): an outcome of its settings (a learning
# rate too large), not a fault; re-running it unchanged diverges again.
DIVERGED_EXIT = 3
# How a run's log says its program could not be started (a missing python): re-running it unchanged fails alike.
NOT_STARTED = "the run could not be started"


@dataclass(frozen=True)
class Run:
    """One ``nola-vision fit`` process: its command line, the file that receives its output, and the descriptor of
    its run's claim lock (``results.claim_run``), which a local fit inherits and so holds for as long as it lives.

    A cluster job cannot inherit a descriptor from the command's node: it locks ``job_lock`` instead, and runs no fit
    where ``finished()`` says the run's result counts already (``claimed_job``)."""

    cmd: Tuple[str, ...]
    log: Path
    claim: Optional[int] = None
    job_lock: Optional[Path] = None
    finished: Optional[Callable[[], bool]] = None


_RUNNING: Set[subprocess.Popen] = set()  # the fits this process started and waits for
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set by a stop (SIGTERM, Ctrl-C): no run starts until its context is left
_STOP_GRACE_S = 25.0  # how long a stop waits for the fits it terminated, all together, before killing the rest
# (below SLURM's default KillWait of 30 s, after which the scheduler kills this process too)


class Stopped(RuntimeError):
    """A run was not started because this process is stopping (SIGTERM or Ctrl-C)."""


def call(cmd: Sequence[str], log: str, env: Optional[Dict[str, str]] = None,
         pass_fds: Sequence[int] = ()) -> Tuple[int, float]:
    """Run ``cmd`` with its output in ``log`` (after the command line); return its exit code and wall seconds.
    ``pass_fds``: descriptors the process inherits (a run's claim lock).

    Raises :class:`Stopped`, without starting it or touching ``log``, while this process is stopping."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    process = _start(cmd, log, env, pass_fds)
    try:
        code = process.wait()
    except BaseException:  # interrupted while waiting (a cancelled submitit job): stop the fit, not orphan it
        process.terminate()
        raise
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(process)
    return code, round(time.monotonic() - start, 1)


def claimed_job(cmd: Sequence[str], log: str, lock: Optional[Path] = None,
                finished: Optional[Callable[[], bool]] = None) -> Tuple[int, float]:
    """A cluster job's ``call``: under ``lock``, which its fit inherits, so that it is held as long as the fit lives.

    The command that submitted the job may be killed (``kill -9``) while its jobs go on; a re-run then sees the lock
    held and starts no second fit there. A job a killed command left queued waits here for the lock, and runs no fit
    once ``finished()`` says the other job's result counts: its wall time is then the wait."""
    if lock is None:
        return call(cmd, log)
    start = time.monotonic()
    fd = try_lock(lock, wait=True)
    try:
        if finished is not None and finished():
            return 0, round(time.monotonic() - start, 1)
        return call(cmd, log, pass_fds=(fd,) if os.name == "posix" else ())
    finally:
        os.close(fd)


def failure(code: int, log: Path) -> str:
    """Why a run with exit ``code`` failed, for the failure list: ``fit`` refused to run (``CONFIG_EXIT``), its
    training diverged (``DIVERGED_EXIT``), each with its error line, its program could not start (``NOT_STARTED``),
    or its exit code with the error line it printed (a failure after training started: a corrupt image, a full
    disk), where it printed one."""
    if code == CONFIG_EXIT:
        return f"fit refused to run: {_error_line(log)}"
    if code == DIVERGED_EXIT:  # fit's own line names the step and the lr: once, without its program prefix
        line = _error_line(log).removeprefix("nola-vision: error: ")
        return line if line.startswith("training diverged") else f"training diverged: {line}"
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
        not_started = [line for line in lines if line.startswith(NOT_STARTED)]
    except OSError:
        not_started = []
    if not_started:
        return not_started[-1]
    line = _error_line(log)
    return f"exit {code}: {line}" if "error:" in line else f"exit {code}"


def _error_line(log: Path) -> str:
    """The last ``error:`` line a run printed to its log (after its command line), or a pointer to the log."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()[1:]
    except OSError:
        lines = []
    errors = [line.strip() for line in lines if "error:" in line]
    return errors[-1] if errors else f"see {log}"


def _start(cmd: Sequence[str], log: str, env: Optional[Dict[str, str]], pass_fds: Sequence[int]) -> subprocess.Popen:
    """Start ``cmd`` and register it as running, unless a stop came first: both under the lock a stop takes, so a
    run either starts before the stop (and is terminated by it) or not at all."""
    with _RUNNING_LOCK:
        if _STOPPING.is_set():
            raise Stopped(f"not started, this process is stopping (SIGTERM or Ctrl-C): {' '.join(cmd)}")
        # UTF-8 as every other file the runs write (the locale's encoding failed on a non-ASCII path under LC_ALL=C)
        with open(log, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            process = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)
        _RUNNING.add(process)
    return process


def stopping() -> bool:
    """Whether this process is stopping (SIGTERM or Ctrl-C): callers start no further work."""
    return _STOPPING.is_set()


def stopping_within(seconds: float) -> bool:
    """Wait up to ``seconds`` for a stop; whether this process is stopping (at once when it begins to)."""
    return _STOPPING.wait(seconds)


@contextlib.contextmanager
def stop_runs_on_signals() -> Iterator[None]:
    """Inside it, SIGTERM (``kill``, a scheduler's cancel), SIGHUP (the login node's terminal closed) or Ctrl-C starts
    no further run, stops the fits this process started (cancels its SLURM jobs), then exits 143 (SIGTERM), 129
    (SIGHUP) or 130 (Ctrl-C): left running, they would hold their devices and race a re-run for the same folders.
    Ctrl-C and SIGHUP are left alone where they are ignored (a background job, ``nohup``); on leaving, the previous
    handlers are back and a stop is over: a process that goes on (a notebook) can start runs again."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    signals = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
    previous = {signum: signal.getsignal(signum) for signum in signals}
    signal.signal(signal.SIGTERM, _stop)
    if previous[signal.SIGINT] is signal.default_int_handler:
        signal.signal(signal.SIGINT, _stop)
    if hasattr(signal, "SIGHUP") and previous[signal.SIGHUP] is signal.SIG_DFL:  # nohup sets SIG_IGN: left so
        signal.signal(signal.SIGHUP, _stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _STOPPING.clear()  # its runs are over: executors wait for their workers when left


def _stop(signum: int, frame: object) -> None:
    """The signal handler of :func:`stop_runs_on_signals` (the main thread never holds ``_RUNNING_LOCK``)."""
    with _RUNNING_LOCK:
        _STOPPING.set()
        running = list(_RUNNING)
    for process in running:
        process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S  # one for all: waiting for each in turn could take N times as long
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
    raise SystemExit(128 + signum)


class Executor:
    """Runs batches of :class:`Run`; ``capacity`` is how many may run at once (callers size their threads by it)."""

    capacity: int = 1

    def run(self, runs: Sequence[Run]) -> Iterator[Tuple[Run, int, float]]:
        """Start every run; yield ``(run, exit code, wall seconds)`` as each finishes."""
        raise NotImplementedError


def start_no_more(results: Iterator[Tuple[Run, int, float]]) -> None:
    """Leave a batch early (a run its fit refused, exit 2, whose siblings share its settings): the executor starts
    none of the runs still queued; the local one waits for those running, submitit cancels them."""
    getattr(results, "close", lambda: None)()  # a generator's close runs run()'s finally; a list has nothing to stop


class LocalExecutor(Executor):
    """Up to ``jobs`` subprocesses at once on this machine, shared by every caller (thread-safe).

    With CUDA, each job slot gets its own ``CUDA_VISIBLE_DEVICES`` (``gpus_per_job`` devices, round-robin over the
    visible ones), so ``--jobs 4`` on a 4-GPU machine runs one run per GPU; ``gpus_per_job=0`` runs every job on
    the CPU. More than the visible devices is refused: a slot would list one device twice. A run that cannot be
    started (its command's program is missing) exits -1, with the reason in its log.
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
            # the fit inherits its claim (not PR_SET_PDEATHSIG): if we die, a re-run skips the live fit, not doubles it
            claim = () if run.claim is None or os.name != "posix" else (run.claim,)  # Windows: no lock, no fd passing
            try:
                return call(run.cmd, str(run.log), env, claim)
            except OSError as err:  # no such python: one failed run (the others go on), as a failed submitit job is
                with open(run.log, "a", encoding="utf-8", errors="surrogateescape") as f:
                    f.write(f"\n{NOT_STARTED}: {err}\n")
                return -1, 0.0
        finally:
            with self._lock:
                self._free.append(slot)
                self._lock.notify()

    def run(self, runs: Sequence[Run]) -> Iterator[Tuple[Run, int, float]]:
        """Run them, up to ``capacity`` at once; yield each as it finishes. A run is started only once the caller
        has taken the results before it (a pool of its own started the next queued run the moment one ended, before
        the caller saw that it was refused). Left early (a stop, an error), it starts no other run and waits for the
        running ones."""
        if not runs:
            return
        queued = list(runs)
        pool = ThreadPoolExecutor(max_workers=min(len(runs), self.capacity))
        running: Dict[Future, Run] = {}
        try:
            while queued or running:
                while queued and len(running) < self.capacity:
                    run = queued.pop(0)
                    running[pool.submit(self._call, run)] = run
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield (running.pop(future), *future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


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
        try:
            import submitit
        except ImportError as err:  # an optional dependency: say how to get it, not a traceback
            raise ValueError(f"--executor {'slurm' if cluster == 'slurm' else 'submitit_local'} runs the fits through "
                             "submitit, which is not installed: pip install 'nola_vision[slurm]' (or pip install "
                             f"submitit) ({err})") from err

        # a job that cannot be scheduled fails every run alike ("exit -1", no output), re-run after re-run
        for value, option, least in ((jobs, "--jobs", 1), (time_min, "--slurm_time", 1),
                                     (cpus_per_task, "--slurm_cpus_per_task", 1),
                                     (gpus_per_node, "--slurm_gpus_per_node", 0)):
            if value < least:
                raise ValueError(f"{option} must be at least {least}, got {value}")
        self.capacity, self.poll_s, self.local = jobs, poll_s, cluster == "local"
        try:
            self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        except RuntimeError as err:  # no srun here: a setting refused before any run (exit 2), not a failed run
            raise ValueError(f"--executor slurm submits the fits to SLURM, which this machine has not ({err}): run the "
                             "command on a SLURM login node, or pass --executor local") from err
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
        with _children_take_sigint() if self.local else contextlib.nullcontext():
            jobs = self.executor.map_array(claimed_job, [list(r.cmd) for r in runs], [str(r.log) for r in runs],
                                           [r.job_lock for r in runs], [r.finished for r in runs])
        pending = dict(zip(jobs, runs))
        try:
            yield from self._results(pending)
        finally:  # left early (a stop, an error): the array's jobs would go on, queued ones starting later
            for job in pending:
                job.cancel(check=False)

    def _results(self, pending: Dict[Any, Run]) -> Iterator[Tuple[Run, int, float]]:
        """Yield each job's run as it finishes, removing it from ``pending``."""
        while pending:
            for job in [j for j in pending if j.done()]:
                run = pending.pop(job)
                try:
                    code, wall = job.result()
                except Exception as err:  # the job itself failed (time limit, node failure): report, do not count
                    with open(run.log, "a", encoding="utf-8", errors="surrogateescape") as f:
                        f.write(f"\nsubmitit job {job.job_id} failed: {err}\n")
                    code, wall = -1, 0.0
                yield run, code, wall
            if pending and stopping():  # stopped while another thread reads the results (tune's workers)
                raise Stopped(f"stopped waiting for {len(pending)} submitit job(s): this process is stopping")
            if pending:
                time.sleep(self.poll_s)


@contextlib.contextmanager
def _children_take_sigint() -> Iterator[None]:
    """submitit cancels a local job with SIGINT, which a command started with it ignored (``nohup``, ``cmd &`` in a
    script) would pass on to the processes it starts as ignored too, so they ran on: they are started while this
    (main) thread takes SIGINT as Python does, which they start with."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if not ignored or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


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
