"""Retry only what a retry can fix.

The GPU rules have `retries: 1` with attempt-scaled memory, for jobs killed for memory. A missing model
directory, bad data or a full disk fail the same way again, after loading the model a second time. So:

- a stage that dies of such an error prints `PERMANENT_MARKER` as the last line of its log (`run_stage`);
- a failed job's shell keeps a copy of its log beside it (`SHELL_RECORD`: `<log>.previous`), because
  Snakemake deletes the log before the next attempt;
- the rule's shell starts with `SHELL_GUARD`: on attempt 2 it finds the marker in that copy and fails at once,
  before anything loads, putting attempt 1's log back in place with a line saying why.

A job killed without a word (the OOM killer, a SLURM memory limit, preemption) leaves no marker and is
retried, as is a Python out-of-memory or connection error.
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
#: shell suffix of every retried rule, after its `> {log} 2>&1`: keep the log of a failed attempt
SHELL_RECORD = " || python -m emotion_neurons.retry --log {log} --failed $?"

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


def previous_log(log: str | Path) -> Path:
    """Where a failed attempt's log is kept for the next attempt."""
    return Path(f"{log}.previous")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Refuse a retry whose previous attempt failed permanently")
    ap.add_argument("--log", required=True, help="the job's log file")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--attempt", type=int, help="before the stage: this attempt's number (guard)")
    mode.add_argument("--failed", type=int, help="after the stage failed: its exit status (keep its log)")
    a = ap.parse_args(argv)
    log, kept = Path(a.log), previous_log(a.log)
    if a.failed is not None:
        if log.is_file():
            kept.write_bytes(log.read_bytes())
        return a.failed or 1
    if a.attempt <= 1:
        kept.unlink(missing_ok=True)  # left by an earlier run: never blocks a fresh start
        return 0
    if not kept.is_file():
        return 0
    raw = kept.read_bytes()
    line = previous_failure(raw.decode(errors="replace"))
    if line is None:
        return 0
    msg = f"attempt {a.attempt} not run: attempt {a.attempt - 1} ended with an error a retry cannot fix ({line})"
    print(f"{msg}; see {log}", file=sys.stderr)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(raw + (b"" if raw.endswith(b"\n") else b"\n") + msg.encode() + b"\n")
    return PERMANENT_EXIT


if __name__ == "__main__":
    sys.exit(main())
