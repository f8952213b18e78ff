"""`lumo serve` under load: a bounded sweep of concurrent clients against localhost.

    python -m benchmarks.serve [--run DIR] [--clients 1,4,16,64] [--requests 8] [--replicas 1]

Starts `lumo serve` (a subprocess, as a user does) once per setting: batched (serve.max_batch_size 8,
a batch generated together), exact (8, serve.exact: one by one inside a batch) and off (1). Each
client thread sends `--requests` t2i requests one after another (a fixed seed per request); the table
has p50 / p95 / p99 latency, requests/s and errors per client count, and the throughput at 16 clients
over 1 client (after one warm-up request per server, not counted). "same as exact" counts the batched answers whose bytes equal the exact setting's answer
to the same request. Then the kill phase: 16 clients on a batched server, its replica killed (SIGKILL)
after a third of the requests; clients retry a failed request (it is idempotent: same body, same
answer) until it succeeds; every request must come back once Serve has restarted the replica.
Without --run it uses an untrained tiny run (the cost of a generation is the same). Prints the tables;
nothing is asserted here (targets live in benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROMPT = "two red circles on the left"


def post(port: int, body: dict) -> tuple[int, float, str]:
    """(status, seconds, sha256 of the answer); status 0: no HTTP answer (connection refused / reset)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=json.dumps(body).encode(), method="POST")
    t0 = time.perf_counter()
    digest = ""
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            digest = hashlib.sha256(r.read()).hexdigest()
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except OSError:
        code = 0
    return code, time.perf_counter() - t0, digest


def run_clients(client, n: int) -> float:
    """client(0) .. client(n - 1) on n threads at once; the seconds until the last one is done."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def sweep(port: int, clients: list[int], requests: int, answers: dict) -> list[dict]:
    """answers: (clients, seed) -> sha256 of the answer, filled in."""
    rows = []
    for c in clients:
        lat, codes, lock = [], [], threading.Lock()

        def client(i: int) -> None:
            for j in range(requests):
                code, s, digest = post(port, {"task": "t2i", "prompt": PROMPT, "seed": i * 1000 + j})
                with lock:
                    codes.append(code)
                    lat.append(s)
                    answers[(c, i * 1000 + j)] = digest

        wall = run_clients(client, c)
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
        rows.append({"clients": c, "requests": len(lat), "errors": sum(x != 200 for x in codes),
                     "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98], "rps": len(lat) / wall})
    return rows


def kill_phase(port: int, clients: int, requests: int, server: subprocess.Popen) -> dict:
    """Clients that retry through a replica kill: how many requests failed at least once, retries, and
    how many never came back (lost)."""
    import psutil

    done, failed_once, retries, lost, lock = [0], set(), [0], [0], threading.Lock()
    killed = threading.Event()

    def client(i: int) -> None:
        for j in range(requests):
            deadline = time.time() + 180
            while True:
                code, _, _ = post(port, {"task": "t2i", "prompt": PROMPT, "seed": i * 1000 + j})
                if code == 200:
                    break
                with lock:
                    failed_once.add((i, j))
                    retries[0] += 1
                if time.time() > deadline or code not in (0, 500, 502, 503, 504):
                    with lock:
                        lost[0] += 1
                    break
                time.sleep(0.5)
            with lock:
                done[0] += 1
                if done[0] == clients * requests // 3 and not killed.is_set():
                    killed.set()
                    for proc in psutil.Process(server.pid).children(recursive=True):
                        if "ServeReplica" in " ".join(proc.cmdline()):
                            proc.kill()

    wall = run_clients(client, clients)
    return {"clients": clients, "requests": clients * requests, "killed": killed.is_set(),
            "failed_once": len(failed_once), "retries": retries[0], "lost": lost[0], "wall_s": wall}


def serve(run: Path, port: int, batch: int, replicas: int, exact: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "lumo_ray.cli", "serve", "--run", str(run), "--port", str(port),
                          "--replicas", str(replicas), "--set", f"serve.max_batch_size={batch}", "--set", "serve.max_n=1",
                          "--set", f"serve.exact={str(exact).lower()}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return p
        except OSError:
            time.sleep(1)
    p.kill()
    raise RuntimeError("lumo serve did not start:\n" + p.stdout.read()[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="token-LM / stage-4 run (default: an untrained tiny run)")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="serve.max_batch_size of the batched and exact settings")
    ap.add_argument("--settings", default="exact,batched,off", help="which settings to sweep (the kill phase runs "
                    "with batched)")
    a = ap.parse_args()
    clients = [int(x) for x in a.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="lumo-bench-serve-"))
    run = Path(a.run) if a.run else None
    if run is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_generate_decode import make_tiny_run

        run = make_tiny_run(tmp / "run")
    print(f"# lumo serve load sweep: run {run}, {a.requests} t2i requests per client, {a.replicas} replica(s); "
          f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs")
    print("| batching | clients | requests | errors | p50 ms | p95 ms | p99 ms | req/s | same as exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratio, answers = {}, {}
    b = a.batch
    settings = {"exact": (f"exact ({b})", b, True), "batched": (f"batched ({b})", b, False), "off": ("off (1)", 1, False)}
    for name, batch, exact in (settings[k] for k in a.settings.split(",")):
        port = _port()
        p = serve(run, port, batch, a.replicas, exact)
        answers[name] = {}
        try:
            post(port, {"task": "t2i", "prompt": PROMPT, "seed": 10**6})  # warm-up, not counted
            rows = sweep(port, clients, a.requests, answers[name])
        finally:
            p.send_signal(2)
            p.communicate(timeout=120)
        for r in rows:
            ref = answers.get(f"exact ({b})", {})
            same = [answers[name][k] == ref.get(k) for k in answers[name] if k[0] == r["clients"]]
            print(f"| {name} | {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
                  f"| {r['p99_ms']:.0f} | {r['rps']:.2f} | {f'{sum(same)}/{len(same)}' if ref else '-'} |")
        by = {r["clients"]: r["rps"] for r in rows}
        if 1 in by and 16 in by:
            ratio[name] = by[16] / by[1]
    for name, x in ratio.items():
        print(f"throughput at 16 clients / 1 client, {name}: {x:.2f}x (target with batching: >= 3x)")
    port = _port()
    p = serve(run, port, b, a.replicas)
    try:
        k = kill_phase(port, 16, a.requests, p)
    finally:
        p.send_signal(2)
        p.communicate(timeout=120)
    print("\n| replica killed | clients | requests | failed at least once | retries | lost | wall s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {'yes' if k['killed'] else 'NO'} | {k['clients']} | {k['requests']} | {k['failed_once']} | {k['retries']} "
          f"| {k['lost']} | {k['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
