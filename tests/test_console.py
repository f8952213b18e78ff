"""The console: progress on a terminal is one bar redrawn in place (count, rate, ETA), through a pipe
(CI, `ray job logs`) the caller's plain lines a tenth apart, an ETA only once a rate is measured, a
heartbeat line through a silence, lines that reach a pipe as they are printed; a Ray driver's console
without Ray's C++ lines or colour codes; a Ray actor's exit leaves no traceback."""
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LOOP = """
import time
from lumo_ray.runtime import Progress
bar = Progress(20, "[tokenize] shards", "shards")
for i in range(1, 21):
    time.sleep(0.01)
    bar.update(i, lambda: f"[tokenize] {i}/20 shards")
bar.close()
"""


def _run(tty: bool) -> str:
    if not tty:
        return subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, timeout=60).stdout
    import fcntl
    import struct
    import termios

    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    p = subprocess.Popen([sys.executable, "-c", LOOP], stdout=sub, stderr=sub)
    os.close(sub)
    out = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    p.wait(60)
    os.close(main)
    return out.decode(errors="replace")


def test_a_terminal_gets_one_bar_redrawn_in_place():
    out = _run(tty=True)
    assert "\r" in out and "[tokenize] shards" in out and "20/20" in out
    assert " shards/s]" in out or "s/ shards]" in out  # tqdm's rate
    assert out.count("\n") <= 2 and "[tokenize] 2/20 shards" not in out  # no plain lines


def test_a_pipe_gets_plain_lines_a_tenth_apart():
    out = _run(tty=False)
    assert out.splitlines() == [f"[tokenize] {i}/20 shards" for i in (1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 20)]
    assert "\r" not in out


def test_an_exit_raised_in_a_weakref_callback_is_not_printed_other_unraisables_are():
    """Ray stops a finished trial actor with SIGTERM; its handler's SystemExit can land in a weakref
    callback, which Python prints as 'Exception ignored ... Traceback' (pipelines.ray_env.quiet_actor_exit)."""
    code = """
import gc, sys, weakref
from pipelines.ray_env import quiet_actor_exit
quiet = len(sys.argv) > 1
if quiet:
    quiet_actor_exit()
class A: pass
def cb(_):
    raise SystemExit(1)
def other(_):
    raise ValueError("a real problem")
a, b = A(), A()
r1, r2 = weakref.ref(a, cb), weakref.ref(b, other)
del a, b
gc.collect()
print("alive")
"""
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, timeout=60)
    assert loud.stdout.strip() == quiet.stdout.strip() == "alive"
    assert "SystemExit" in loud.stderr and "ValueError: a real problem" in loud.stderr
    assert "SystemExit" not in quiet.stderr and "ValueError: a real problem" in quiet.stderr


def test_the_first_progress_line_gives_no_eta_the_rate_is_measured_after_it():
    """The first units carry the loop's start-up (27 s of Ray actors starting for a 29 s tokenize
    printed 'ETA 1056 s'): the first line says how long they took, later lines a rate from there on."""
    from lumo_ray.runtime import Progress, Rate

    shards = Rate(40, unit="shards", t0=time.time() - 27.0)  # 27 s of start-up before the first shard
    first = shards(1)
    assert first.startswith("1 shard in 27.") and "ETA" not in first
    time.sleep(0.2)
    later = shards(3)  # 2 shards in ~0.2 s: ~10 shards/s, ETA a few seconds
    rate, eta = re.fullmatch(r"([\d.]+) shards/s, ETA (\d+) s", later).groups()
    assert float(rate) > 2 and int(eta) < 20
    assert Rate(20)(20) == "20 steps in 0.0 s"  # a one-line loop
    assert Rate(40, start=10)(11) == "1 step in 0.0 s"  # a resumed loop counts the units of this start
    # each loop keeps its own first tick: two loops started in the same instant do not share one
    a, b = Progress(10, "a", "parts", log=lambda _: None).rate, Progress(10, "b", "parts", log=lambda _: None).rate
    assert a(2).startswith("2 parts in") and b(5).startswith("5 parts in") and "ETA" in a(4)


HEARTBEAT = """
import time
from lumo_ray import runtime
runtime.HEARTBEAT_S = 0.5
with runtime.heartbeat("waiting on a slow thing"):
    print("start", flush=False)  # line-buffered: reaches the pipe now, not at exit
    time.sleep(1.6)
    with runtime.heartbeat("an inner step"):
        time.sleep(1.6)
    for i in range(10):  # a chatty block: no heartbeat between its own lines
        print(f"line {i}")
        time.sleep(0.05)
time.sleep(0.8)  # no activity: silence is fine
print("\\x1b[32mend\\x1b[0m")  # Ray's colour on its "[repeated 2x across cluster]" note: off through a pipe
"""


def test_a_silent_block_gets_heartbeat_lines_and_lines_reach_a_pipe_as_printed_plain():
    p = subprocess.Popen([sys.executable, "-c", HEARTBEAT], stdout=subprocess.PIPE, text=True, cwd=REPO)
    t0, got = time.monotonic(), []
    for line in p.stdout:
        got.append((time.monotonic() - t0, line.rstrip("\n")))
    assert p.wait(60) == 0
    lines = [s for _, s in got]
    beats = [s for s in lines if s.startswith("... still ")]
    assert lines[0] == "start" and got[0][0] < got[-1][0] - 2  # arrived while the process slept
    assert re.fullmatch(r"\.\.\. still waiting on a slow thing \(elapsed \d+ s\)", beats[0])
    assert any(s.startswith("... still an inner step (elapsed") for s in beats)  # the innermost names it
    chatty = lines[lines.index("line 0"):lines.index("line 9") + 1]
    assert chatty == [f"line {i}" for i in range(10)] and lines[-1] == "end"
    assert 2 <= len(beats) <= 8


DRIVER = """
import os, sys, time
import numpy as np
import ray
from pipelines.ray_env import init_ray

init_ray(sys.argv[1])


@ray.remote(num_cpus=0, max_restarts=1)
class Holder:  # a restartable actor with a constructor argument in the object store: Ray's core worker
    def __init__(self, blob):  # logs a C++ ERROR line ("... max_restarts > 0"), as for every Ray Data pool
        self.n = len(blob)

    def size(self):
        return self.n


@ray.remote(num_cpus=0)
def worker_side():
    print("hello from a worker")
    return ray.get(Holder.remote(np.zeros(200_000, np.uint8)).size.remote())  # the line, in a worker


print(ray.get(Holder.remote(np.zeros(200_000, np.uint8)).size.remote()), ray.get(worker_side.remote()))
time.sleep(3)  # the workers' lines reach the driver through Ray's log monitor
print("done", os.getpid(), file=sys.stderr)
"""


def test_a_ray_driver_console_through_a_pipe_has_no_cpp_lines_nor_colour_codes(ray_local):
    """A driver that joins Ray (init_ray) through a pipe: the workers' lines come with their plain
    (pid=...) prefix, Ray's C++ lines (here the core worker's max_restarts warning, from the driver
    and from a worker) stay in Ray's session logs, and the driver's own stderr still comes through."""
    address = ray_local.get_runtime_context().gcs_address
    p = subprocess.run([sys.executable, "-c", DRIVER, address], capture_output=True, text=True, timeout=300, cwd=REPO)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"[ray] joining the Ray cluster at {address}" in p.stdout and "200000 200000" in p.stdout
    assert re.search(r"^\(worker_side pid=\d+\) hello from a worker$", p.stdout, re.M), out[-3000:]
    assert "\x1b[" not in out and ".cc:" not in out, out[-3000:]
    pid = re.search(r"^done (\d+)$", p.stderr, re.M).group(1)  # its own stderr, through the filter
    logs = Path(ray_local._private.worker.global_worker.node.get_logs_dir_path())
    assert "max_restarts > 0" in next(logs.glob(f"python-core-driver-*_{pid}.log")).read_text()
