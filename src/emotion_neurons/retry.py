"""Retry only what a retry can fix.

The GPU rules have `retries: 1` with attempt-scaled memory, for jobs killed for memory. A missing model
directory, bad data or a full disk fail the same way again, after loading the model a second time. So a stage
that dies of such an error prints `PERMANENT_MARKER` as the last line of its log (`run_stage`), and the rule's
shell runs `python -m emotion_neurons.retry --log {log} --attempt N` first: on attempt 2 it finds the marker in
attempt 1's log and fails at once, before anything loads. A job killed without a word (the OOM killer, SLURM
memory limit, preemption) leaves no marker and is retried, as is a Python out-of-memory or connection error.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

PERMANENT_MARKER = "emotion-neurons: permanent failure"
#: exit status of a stage that failed permanently (any non-zero status fails the Snakemake job)
PERMANENT_EXIT = 3
#: shell prefix of every retried rule (`{log}` and `{resources.attempt}` are filled in by Snakemake)
SHELL_GUARD = "python -m emotion_neurons.retry --log {log} --attempt {resources.attempt} && "

_TRANSIENT_NAMES = {"OutOfMemoryError", "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout"}
_OOM_TEXT = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def _chain(exc: BaseException):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry can fix: out of memory (host or GPU) and lost connections/timeouts.

    Anything else (missing files or directories, bad data or config, a full disk, programming errors) fails
    the same way on a retry.
    """
    for e in _chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, (MemoryError, ConnectionError, TimeoutError)) or names & _TRANSIENT_NAMES:
            return True
        if isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXT):
            return True
    return False


def run_stage(main: Callable[[], int]) -> int:
    """Run a stage's `main`; on a permanent error print the traceback and the marker, return PERMANENT_EXIT."""
    try:
        return main()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        if is_transient(e):
            raise
        traceback.print_exc()
        print(
            f"{PERMANENT_MARKER}: {type(e).__name__}: {e} (a retry cannot fix this; the job is not retried)",
            file=sys.stderr,
            flush=True,
        )
        return PERMANENT_EXIT


def previous_failure(log_text: str) -> str | None:
    """The marker line of a permanent failure in a previous attempt's log, else None."""
    for line in reversed(log_text.splitlines()):
        if line.startswith(PERMANENT_MARKER):
            return line
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Refuse a retry whose previous attempt failed permanently")
    ap.add_argument("--log", required=True, help="the job's log (still holding the previous attempt's output)")
    ap.add_argument("--attempt", type=int, required=True)
    a = ap.parse_args(argv)
    log = Path(a.log)
    if a.attempt <= 1 or not log.is_file():
        return 0
    line = previous_failure(log.read_text(errors="replace"))
    if line is None:
        return 0
    msg = f"attempt {a.attempt} not run: attempt {a.attempt - 1} ended with an error a retry cannot fix ({line}); see {log}"
    print(msg, file=sys.stderr)
    with open(log, "a") as f:
        f.write(msg + "\n")
    return PERMANENT_EXIT


if __name__ == "__main__":
    sys.exit(main())
