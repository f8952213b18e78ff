"""`lumo serve` under load: a bounded sweep of concurrent clients against localhost.

    python -m benchmarks.serve [--run DIR] [--clients 1,4,16,64] [--requests 8] [--replicas 1]

Starts `lumo serve` (a subprocess, as a user does) once per setting: batching on (serve.max_batch_size
8) and off (1). Each client thread sends `--requests` t2i requests one after another (fixed seeds);
the table has p50 / p95 / p99 latency, requests/s and errors per client count, and the throughput at
16 clients over 1 client. Without --run it uses an untrained tiny run (the cost of a generation is the
same). Prints the table; nothing is asserted here (targets live in benchmarks/README.md).
"""
from __future__ import annotations

import argparse
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


def post(port: int, body: dict) -> tuple[int, float]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=json.dumps(body).encode(), method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except OSError:
        code = 0
    return code, time.perf_counter() - t0


def sweep(port: int, clients: list[int], requests: int) -> list[dict]:
    rows = []
    for c in clients:
        lat, codes, lock = [], [], threading.Lock()

        def client(i: int) -> None:
            for j in range(requests):
                code, s = post(port, {"task": "t2i", "prompt": "two red circles on the left", "seed": i * 1000 + j})
                with lock:
                    codes.append(code)
                    lat.append(s)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
        rows.append({"clients": c, "requests": len(lat), "errors": sum(x != 200 for x in codes),
                     "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98], "rps": len(lat) / wall})
    return rows


def serve(run: Path, port: int, batch: int, replicas: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "lumo_ray.cli", "serve", "--run", str(run), "--port", str(port),
                          "--replicas", str(replicas), "--set", f"serve.max_batch_size={batch}", "--set", "serve.max_n=1"],
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
    print("| batching | clients | requests | errors | p50 ms | p95 ms | p99 ms | req/s |")
    print("|---|---|---|---|---|---|---|---|")
    ratio = {}
    for name, batch in (("on (8)", 8), ("off (1)", 1)):
        port = _port()
        p = serve(run, port, batch, a.replicas)
        try:
            rows = sweep(port, clients, a.requests)
        finally:
            p.send_signal(2)
            p.communicate(timeout=120)
        for r in rows:
            print(f"| {name} | {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
                  f"| {r['p99_ms']:.0f} | {r['rps']:.2f} |")
        by = {r["clients"]: r["rps"] for r in rows}
        if 1 in by and 16 in by:
            ratio[name] = by[16] / by[1]
    for name, x in ratio.items():
        print(f"throughput at 16 clients / 1 client, batching {name}: {x:.2f}x (target with batching: >= 3x)")


if __name__ == "__main__":
    main()
