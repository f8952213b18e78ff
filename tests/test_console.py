"""The console: progress on a terminal is one bar redrawn in place (count, rate, ETA), through a pipe
(CI, `ray job logs`) the caller's plain lines a tenth apart; a Ray actor's exit leaves no traceback."""
import os
import pty
import subprocess
import sys

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
