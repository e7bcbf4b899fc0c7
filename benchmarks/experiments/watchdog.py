"""Run a Python module or script; if it is still running after SECONDS, print the main thread's whole
stack with runs of repeated frames collapsed, then exit with status 124.

faulthandler prints only the innermost 100 frames of a thread. When inductor recursed through nested
IR ``__str__`` calls (sixth 12-03 session, RESULTS.md), those 100 frames were all ``ir.py`` and the
caller stayed hidden. This prints the outermost frames too.

    python benchmarks/experiments/watchdog.py SECONDS -m hybridlm.cli profile ...
    python benchmarks/experiments/watchdog.py SECONDS path/to/script.py ARGS...
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
import traceback


def collapsed(frames) -> list[str]:
    """'file:line in name' lines, runs of one repeating cycle (up to 8 frames long) shown once with a count."""
    lines = [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]
    out, i = [], 0
    while i < len(lines):
        for period in range(1, 9):
            reps = 1
            while lines[i + reps * period:i + (reps + 1) * period] == lines[i:i + period]:
                reps += 1
            if reps >= 3:
                out += lines[i:i + period] + [f"  ... the {period} frame(s) above repeat {reps} times"]
                i += reps * period
                break
        else:
            out.append(lines[i])
            i += 1
    return out


def dump_and_exit(seconds: float, main_id: int) -> None:
    frame = sys._current_frames().get(main_id)
    stack = traceback.extract_stack(frame) if frame is not None else []
    print(f"\nwatchdog: still running after {seconds:g} s; main thread, outermost first "
          f"({len(stack)} frames):", file=sys.stderr)
    for line in collapsed(stack):
        print("  " + line, file=sys.stderr)
    sys.stderr.flush()
    os._exit(124)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    seconds = float(sys.argv[1])
    timer = threading.Timer(seconds, dump_and_exit, (seconds, threading.main_thread().ident))
    timer.daemon = True
    timer.start()
    if sys.argv[2] == "-m":
        sys.argv = [sys.argv[3]] + sys.argv[4:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[2:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    timer.cancel()


if __name__ == "__main__":
    main()
