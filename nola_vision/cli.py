"""The ``nola-vision`` console script: dispatch only.

``fit|validate|test|predict`` go to the Lightning CLI (``train.cli``); ``demo``, ``protocol`` and ``tune`` to
their own parsers (``demo``, ``runs.protocol``, ``runs.tune``).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import traceback
from typing import Any, Callable, Iterator, List, Optional, TextIO

import torch

__all__ = ["main"]

HELP = """usage: nola-vision {fit,validate,test,predict,demo,protocol,tune} ...

  fit/validate/test/predict   Lightning CLI over FewShotClassifier + FewShotDataModule
                              (nola-vision fit --help; configs under configs/)
  demo                        offline few-shot demo: linear probe vs LoRA vs NOLA (nola-vision demo --help)
  protocol                    the paper's split-seed x init-seed protocol with a mean (std) table
                              (nola-vision protocol --help)
  tune                        choose hyperparameters on validation accuracy (Optuna), then run the protocol
                              (nola-vision tune --help)
"""


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: dispatch ``demo``/``protocol``/``tune`` to their parsers, everything else to the Lightning CLI."""
    with console_that_cannot_fail_the_run():
        return _dispatch(argv)


class _Console:
    """stdout or stderr as the commands write them: a write the stream refuses (a job log on a full or over-quota
    disk, a closed pipe) sends the rest of that output to the null device, with one line on stderr where stdout
    failed, instead of failing a run whose work is done (its result, adapter and checkpoints are files; the console
    only reports them)."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self._stream, self._name = stream, name
        self._dropped = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            self._drop(error)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            self._drop(error)

    def _drop(self, error: OSError) -> None:
        """Point the stream's file descriptor at the null device, so what it holds flushes there (at exit too)."""
        if not self._dropped:
            self._dropped = True
            if self._name == "stdout":  # stderr may fail too (the same full file): that line is then dropped as well
                print(f"nola-vision: the console output (stdout) cannot be written ({error.strerror or error}): the "
                      "rest of it is dropped, and the command goes on; its files are written as usual", file=sys.stderr)
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def console_that_cannot_fail_the_run() -> Iterator[None]:
    """While a command runs: stdout and stderr that a failed write cannot fail (``_Console``), and that write
    a character the console's encoding lacks (an ASCII locale, a run folder named ``prédictions``) as an escape
    instead of failing after the command's work is done. Both are as they were afterwards. Python's streams in the
    C or POSIX locale use ``surrogateescape``, which fails on such characters too."""
    stdout, stderr, errors = sys.stdout, sys.stderr, {}
    for stream in (sys.stdout, sys.stderr):
        if callable(getattr(stream, "reconfigure", None)) and getattr(stream, "errors", None) in (
                "strict", "surrogateescape"):
            errors[stream] = stream.errors
            stream.reconfigure(errors="backslashreplace")
    sys.stdout = _Console(stdout, "stdout") if stdout is not None else stdout
    sys.stderr = _Console(stderr, "stderr") if stderr is not None else stderr
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        for stream, previous in errors.items():
            with contextlib.suppress(OSError, ValueError):
                stream.reconfigure(errors=previous)


def _dispatch(argv: Optional[List[str]]) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = _imported_command(args[0] if args else "")
    except KeyboardInterrupt:
        print("nola-vision: interrupted (Ctrl-C, SIGINT) while starting: nothing was run", file=sys.stderr)
        return 130
    if command is not None:
        return command(args[1:])
    if not args or args[0] in ("-h", "--help"):
        print(HELP)
        if not args:
            return 2
        print("The Lightning CLI's own help, for fit, validate, test and predict (demo, protocol and tune: above):\n")
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .core.interrupts import sigint_kept, sigterm_raising
    from .runs.executors import CONFIG_EXIT, DIVERGED_EXIT
    from .train.cli import CONFIG_ERRORS, RUN_ERRORS, error_message, keyboard_interrupt_of, run_lightning_cli
    from .train.module import NonFiniteLossError

    try:
        # From the console script, Lightning reads sys.argv itself: given both, it warns on every run that
        # args and command-line arguments were mixed.
        with sigint_kept(), sigterm_raising(SIGTERMException):
            run_lightning_cli(None if argv is None else args)
    except SIGTERMException as stop:  # a SystemExit without a code: the stopped run would exit 0, as if it had finished
        print(f"nola-vision: stopped by SIGTERM {_outcome(stop)}", file=sys.stderr)
        return 143
    except (KeyboardInterrupt, SystemExit) as stop:  # Lightning exits 1 on Ctrl-C, the code of a failed run
        interrupt = keyboard_interrupt_of(stop)
        if interrupt is None:
            raise
        print(f"nola-vision: interrupted (Ctrl-C, SIGINT) {_outcome(interrupt)}", file=sys.stderr)
        return 130
    except CONFIG_ERRORS + RUN_ERRORS + (OSError,) as err:  # OSError: a read or write failed (a full disk, a limit)
        if os.environ.get("NOLA_VISION_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off"):
            raise
        message, kept = error_message(err), _kept(err)
        print(f"nola-vision: error: {message.rstrip('.') + kept if kept else message}\n(set NOLA_VISION_TRACEBACK=1 "
              "to see the traceback)", file=sys.stderr)
        refused = isinstance(err, CONFIG_ERRORS) and not getattr(err, "run_started", False)
        if refused or getattr(err, "before_run", False):  # a refusal before the run; else the run failed
            return CONFIG_EXIT
        return DIVERGED_EXIT if isinstance(err, NonFiniteLossError) else 1
    except Exception as err:  # a run's own failure (out of memory, a callback's bug): its traceback, then what it kept
        kept = _kept(err)
        if not kept:
            raise
        traceback.print_exc()
        memory = isinstance(err, MemoryError) or "out of memory" in str(err).lower()
        hint = " (out of memory: lower --data.batch_size, or train in --trainer.precision bf16-mixed)" if memory else ""
        print(f"nola-vision: error: the run failed with the {type(err).__name__} above{hint}{kept}", file=sys.stderr)
        return 1
    finally:
        close_process_group()
    return 0


def _imported_command(name: str) -> Optional[Callable[[List[str]], int]]:
    """The ``main`` of ``demo``, ``protocol`` or ``tune``; None for the Lightning CLI, whose modules are imported here:
    importing Lightning or Optuna takes seconds, and a Ctrl-C then must say that nothing ran, not give a traceback."""
    if name == "demo":
        from .demo import main as demo_main

        return demo_main
    if name == "protocol":
        from .runs.protocol import main as protocol_main

        return protocol_main
    if name == "tune":
        from .runs.tune import main as tune_main

        return tune_main
    importlib.import_module(".train.cli", __package__)  # with Lightning, torchmetrics and the training modules
    return None


def _outcome(stop: BaseException) -> str:
    """What a stopped run left: its result, written as the run ended (``NolaCLI.written_result``), or none."""
    written = getattr(stop, "written_result", None)
    if written:
        return f"as the run ended, after it wrote its result to {written}"
    return f"before the run finished: no result was written{_kept(stop)}"


def _kept(stop: BaseException) -> str:
    """Where a stopped fit's latest checkpoint is (``FinalWeights`` records it on the exception), or, stopped after
    training finished (in its test pass), its adapter and checkpoint (``NolaCLI.after_fit``), as a sentence."""
    finished = getattr(stop, "finished_fit", None)
    if finished:
        checkpoint = finished["checkpoint"]
        return (f". Training had finished and was kept: adapter {finished['adapter']}, checkpoint "
                f"{checkpoint or '(none)'}" + (f". Get its metrics with: nola-vision test -c <this config> "
                                              f"--ckpt_path {checkpoint}" if checkpoint else "")
                + (f".{finished['note']}" if finished.get("note") else ""))
    kept = getattr(stop, "kept_checkpoint", None)
    return f". The weights of its last saved epoch are kept: resume with --ckpt_path {kept}" if kept else ""


def close_process_group() -> None:
    """Tear down a DDP process group before the interpreter exits: left to exit-time destructors, gloo's threads
    can abort a finished run ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
