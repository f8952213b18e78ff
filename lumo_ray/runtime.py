"""Execution helpers shared by library code (no Ray)."""
from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from typing import Callable

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with exactly `n` intra-op threads, then restore. On CPU, float rounding depends on the
    thread count, and codecs' nearest-code searches can flip on it: encoding runs under the configured
    count (the random presets are built thread-independently, codecs/exact_init.py)."""
    old = torch.get_num_threads()
    if old != n:  # already n (a process set to it, as ShardWriter's concurrent calls are): nothing to undo
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def assigned_device(gpu_ids: list, visible: str | None = None) -> torch.device:
    """The torch device of a Ray unit that Ray gave `gpu_ids` (ray.get_gpu_ids()): cuda:<local index> of
    the first when a GPU was given and CUDA works here, else cpu (a fake GPU, or a CPU-only torch).
    visible: CUDA_VISIBLE_DEVICES (default: this process's), where Ray lists the node's GPUs the unit sees."""
    import os

    if not gpu_ids or not torch.cuda.is_available():
        return torch.device("cpu")
    seen = (os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible).split(",")
    first = str(gpu_ids[0])
    return torch.device(f"cuda:{seen.index(first) if first in seen else 0}")


class Rate:
    """The rate part of one loop's progress lines, for a loop that started at t0 (time.time(), default
    now) at unit `start` and runs to `total`. The first line says how long the first units took ('20
    steps in 4.1 s'): they carry the loop's start-up (Ray actors, a Train worker group, the first batch),
    and a rate through them made the first ETA absurd (ETA 1056 s for a 29 s job). Later lines give the
    rate measured since that first line and the ETA ('12.3 steps/s, ETA 40 s')."""

    def __init__(self, total: int, start: int = 0, unit: str = "steps", t0: float | None = None):
        self.total, self.start, self.unit = total, start, unit
        self.t0 = time.time() if t0 is None else t0
        self.first: tuple[float, int] | None = None
        """(time, done) of the first line: where the rate is measured from."""

    def __call__(self, done: int) -> str:
        """The rate part of the line for `done` of `total` units."""
        now = time.time()
        if self.first is None or done <= self.first[1]:
            self.first = (now, done)
            n = done - self.start
            unit = self.unit[:-1] if n == 1 and self.unit.endswith("s") else self.unit
            return f"{n} {unit} in {now - self.t0:.1f} s"
        rate = (done - self.first[1]) / max(now - self.first[0], 1e-9)
        return f"{rate:.1f} {self.unit}/s, ETA {(self.total - done) / rate:.0f} s"


class Progress:
    """Progress of a loop that runs in this process. On a terminal (stdout a TTY and the log the
    console: print, or `console=True` for a print wrapper): one tqdm bar redrawn in place, with count,
    rate and ETA. Elsewhere (CI, `ray job logs`, a pipe, a caller's own log): the caller's plain line
    at the first update, then whenever `every` more items are done (default a tenth), and at the end.
    `rate(done)` is the rate part of those lines (a Rate from now)."""

    def __init__(self, total: int, desc: str, unit: str, log: Callable[[str], None] = print,
                 every: int | None = None, console: bool | None = None):
        self.total, self.log, self.last = total, log, None
        self.rate = Rate(total, unit=unit)
        self.every = every or max(1, total // 10)
        self.bar = None
        if (log is print if console is None else console) and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stdout, dynamic_ncols=True)

    def update(self, done: int, line: Callable[[], str]) -> None:
        """`done` items so far; line() builds the plain line when one is due (not on a terminal)."""
        if self.bar is not None:
            if self.bar.n == 0 and done > 0:  # the first units carry the start-up: tqdm's rate starts after them
                b = self.bar
                b.n = b.last_print_n = b.initial = done
                b.last_print_t = time.time()
                b.refresh()
            else:
                self.bar.update(done - self.bar.n)
        elif self.last is None or done - self.last >= self.every or done == self.total:
            self.last = done
            self.log(line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the console: a clock, and a heartbeat line through a long silence ----------------------------

HEARTBEAT_S = 7.0  # silence (s) after which a running activity prints "... still <what>": a line at least every 10 s


class _Console:
    """This process's console: when the command's clock started, when stdout / stderr last took a
    write, and the running activities (innermost last) a heartbeat line names."""
    t0 = time.monotonic()
    last = time.monotonic()
    activities: list[tuple[str, float, Callable[[str], None]]] = []
    lock = threading.Lock()
    beat: threading.Thread | None = None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Stamped:
    """stdout / stderr, line-buffered (a line reaches a pipe, `tee` or `ray job logs` when printed, not
    a buffer later), noting when each write came (Ray's thread prints the workers' lines through it
    too), and without ANSI colour codes unless it is a terminal: the one filter for every writer, Ray's
    included (it colours its workers' "(pid=..)" prefixes and its "[repeated 2x across cluster]" note)."""

    def __init__(self, stream):
        self._stream = stream
        try:
            self._plain = not stream.isatty()
        except (AttributeError, ValueError, OSError):
            self._plain = True

    def write(self, s: str) -> int:
        _Console.last = time.monotonic()
        if self._plain and "\x1b[" in s:
            self._stream.write(_ANSI.sub("", s))
            return len(s)
        return self._stream.write(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def watch_console() -> None:
    """Idempotent: stdout and stderr line-buffered and stamped (the heartbeat's measure of silence)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, _Stamped):
            continue
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(line_buffering=True)
        setattr(sys, name, _Stamped(stream))


def start_clock() -> None:
    """The command starts now: elapsed() counts from here (default: from this module's import)."""
    _Console.t0 = time.monotonic()


def elapsed() -> str:
    """'elapsed 87 s' since the command's clock started, for the lines that start and end its stages."""
    return f"elapsed {time.monotonic() - _Console.t0:.0f} s"


@contextlib.contextmanager
def heartbeat(what: str, log: Callable[[str], None] = print):
    """While the block runs, a console silent for HEARTBEAT_S gets '... still <what> (elapsed N s)' (N:
    seconds in the block) from a small thread; nested blocks name the innermost. For the waits that print
    nothing of their own: a Ray start, a Tune trial, an eval, a worker group starting."""
    watch_console()
    entry = (what, time.monotonic(), log)
    with _Console.lock:
        _Console.activities.append(entry)
        if _Console.beat is None:
            _Console.beat = threading.Thread(target=_beat, name="lumo-heartbeat", daemon=True)
            _Console.beat.start()
    try:
        yield
    finally:
        with _Console.lock:
            _Console.activities.remove(entry)


def _beat() -> None:
    while True:
        time.sleep(0.5)
        with _Console.lock:
            top = _Console.activities[-1] if _Console.activities else None
        now = time.monotonic()
        if top is not None and now - _Console.last >= HEARTBEAT_S:
            what, t, log = top
            with contextlib.suppress(Exception):  # a closed console must not kill the command's thread
                log(f"... still {what} (elapsed {now - t:.0f} s)")
            _Console.last = time.monotonic()
