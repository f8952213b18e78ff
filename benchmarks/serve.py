"""`lumo serve` under load: a bounded sweep of concurrent clients against localhost.

    python -m benchmarks.serve [--run DIR] [--clients 1,4,16,64] [--requests 8] [--replicas 1] [--no-kill]

Starts `lumo serve` (a subprocess, as a user does) once per setting: batched (serve.max_batch_size 8,
a batch generated together), exact (8, serve.exact: one by one inside a batch) and off (1). Each
client thread sends `--requests` t2i requests one after another (a fixed seed per request); the table
has p50 / p95 / p99 latency, requests/s and errors per client count, and the throughput at 16 clients
over 1 client (after one warm-up request per server, not counted). "same as exact" counts the batched answers whose bytes equal the exact setting's answer
to the same request. Then the kill phase: 16 clients on a batched server, its model replica killed
(SIGKILL) after a third of the requests; clients retry a failed request (it is idempotent: same body,
same answer) until it succeeds; every request must come back once Serve has restarted the replica. It
counts the failed answers that were a 503 with Retry-After (the server's answer for a lost replica)
and any others, and times GET /health every 0.2 s from the kill to the end (it must answer at once
while the replica restarts: 503 + Retry-After while none runs, then 200).
The openai setting (in --settings) sweeps OpenAI's routes on one batched server: chat with an image
input (i2t) streamed and whole, completions (t2t) streamed, images (t2i); the table adds the time to
first token of the streamed ones (the first content chunk) and the generated tokens per second.
Without --run it uses an untrained tiny run (the cost of a generation is the same). Prints the tables;
nothing is asserted here (targets live in benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import base64
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


def post(port: int, body: dict, path: str = "/v1/generate") -> tuple[int, float, str, str]:
    """(status, seconds, sha256 of the answer, its Retry-After header or ''); status 0: no HTTP answer
    (connection refused / reset). body None: a GET."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data else "GET")
    t0 = time.perf_counter()
    digest, retry = "", ""
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            digest = hashlib.sha256(r.read()).hexdigest()
            code = r.status
    except urllib.error.HTTPError as e:
        code, retry = e.code, e.headers.get("Retry-After") or ""
    except OSError:
        code = 0
    return code, time.perf_counter() - t0, digest, retry


def run_clients(client, n: int) -> float:
    """client(0) .. client(n - 1) on n threads at once; the seconds until the last one is done."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


# Where a sweep's CPU goes: each process of the server's tree by the part it plays, and this process
# (the client threads). Matched on the process title Ray sets (`ray::ServeReplica:lumo:Generator...`).
PARTS = (("model replica", "Generator"), ("gateway", "Gateway"), ("HTTP proxy", "ProxyActor"),
         ("controller", "ServeController"), ("ray core", "raylet"), ("ray core", "gcs_server"))


def cpu_by_part(server: subprocess.Popen) -> dict:
    """part -> CPU seconds (user + system) so far of the server's processes, "clients" this process,
    "machine" every core's busy seconds; a process gone since is not counted (each sweep is short)."""
    import os

    import psutil

    out = {"clients": sum(psutil.Process(os.getpid()).cpu_times()[:2])}
    for proc in psutil.Process(server.pid).children(recursive=True) + [psutil.Process(server.pid)]:
        try:
            cmd, t = " ".join(proc.cmdline()), sum(proc.cpu_times()[:2])
        except psutil.Error:
            continue
        part = next((name for name, key in PARTS if key in cmd), "other ray / lumo serve")
        out[part] = out.get(part, 0.0) + t
    m = psutil.cpu_times()
    out["machine"] = m.user + m.system + getattr(m, "nice", 0.0) + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0)
    return out


def profile_row(before: dict, after: dict, n: int, wall: float) -> dict:
    """CPU ms per request of each part between two cpu_by_part snapshots, and the machine's busy share."""
    import os

    row = {k: 1000 * (after.get(k, 0.0) - before.get(k, 0.0)) / n for k in after if k != "machine"}
    row["busy"] = (after["machine"] - before["machine"]) / (wall * (os.cpu_count() or 1))
    return row


def sweep(port: int, clients: list[int], requests: int, answers: dict, server: subprocess.Popen | None = None) -> list[dict]:
    """answers: (clients, seed) -> sha256 of the answer, filled in. With the server's process, each row
    also has its CPU profile (profile_row)."""
    rows = []
    for c in clients:
        lat, codes, lock = [], [], threading.Lock()

        def client(i: int) -> None:
            for j in range(requests):
                code, s, digest, _ = post(port, {"task": "t2i", "prompt": PROMPT, "seed": i * 1000 + j})
                with lock:
                    codes.append(code)
                    lat.append(s)
                    answers[(c, i * 1000 + j)] = digest

        cpu0 = cpu_by_part(server) if server else None
        wall = run_clients(client, c)
        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
        rows.append({"clients": c, "requests": len(lat), "errors": sum(x != 200 for x in codes),
                     "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98], "rps": len(lat) / wall,
                     "profile": profile_row(cpu0, cpu_by_part(server), len(lat), wall) if server else None})
    return rows


def kill_phase(port: int, clients: int, requests: int, server: subprocess.Popen) -> dict:
    """Clients that retry through a model-replica kill: how many requests failed at least once, retries,
    how many never came back (lost), the failed answers that were 503 + Retry-After and the others, and
    GET /health's latency and answers from the kill to the end."""
    import psutil

    done, failed_once, retries, lost, lock = [0], set(), [0], [0], threading.Lock()
    killed, finished = threading.Event(), threading.Event()
    failures: dict = {}  # (status, has Retry-After) -> count
    health: list = []  # (status, seconds) of each /health after the kill

    def poll_health() -> None:
        killed.wait()
        while not finished.is_set():
            code, s, _, retry = post(port, None, "/health")
            health.append((code, s, bool(retry)))
            time.sleep(0.2)

    def client(i: int) -> None:
        for j in range(requests):
            deadline = time.time() + 180
            while True:
                code, _, _, retry = post(port, {"task": "t2i", "prompt": PROMPT, "seed": i * 1000 + j})
                if code == 200:
                    break
                with lock:
                    failed_once.add((i, j))
                    retries[0] += 1
                    failures[(code, bool(retry))] = failures.get((code, bool(retry)), 0) + 1
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
                        if "ServeReplica" in (cmd := " ".join(proc.cmdline())) and ":Generator" in cmd:
                            proc.kill()  # the model replica, not the Gateway in front of it

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    wall = run_clients(client, clients)
    finished.set()
    was_killed = killed.is_set()
    killed.set()  # (if the kill never came, the poller ends too)
    poller.join()
    lat = sorted(s for _, s, _ in health) or [0.0]
    return {"clients": clients, "requests": clients * requests, "killed": was_killed,
            "failed_once": len(failed_once), "retries": retries[0], "lost": lost[0], "wall_s": wall,
            "retry_503": failures.get((503, True), 0),
            "other_failures": ", ".join(f"{c}{'+RA' if r else ''} x{n}" for (c, r), n in sorted(failures.items())
                                        if (c, r) != (503, True)) or "none",
            "health_n": len(health), "health_p50_ms": 1000 * lat[len(lat) // 2], "health_max_ms": 1000 * lat[-1],
            "health_503": sum(c == 503 and r for c, _, r in health),
            "health_other": sum(c != 200 and not (c == 503 and r) for c, _, r in health)}


def openai_call(port: int, route: str, body: dict) -> tuple[int, float, float, int]:
    """One OpenAI request: (status, seconds, seconds to the first content chunk (a stream) or to the
    answer, completion tokens). A stream is read line by line as its events arrive."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{route}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, tokens = None, 0
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            if not body.get("stream"):
                out = json.loads(r.read())
                tokens = (out.get("usage") or {}).get("completion_tokens", 0)
                return r.status, time.perf_counter() - t0, time.perf_counter() - t0, tokens
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and any((c.get("delta") or {}).get("content") or c.get("text")
                                         for c in chunk.get("choices", [])):
                    first = time.perf_counter() - t0
            code = r.status
    except urllib.error.HTTPError as e:
        code = e.code
    except OSError:
        code = 0
    total = time.perf_counter() - t0
    return code, total, first if first is not None else total, tokens


def openai_bodies(png: bytes) -> dict:
    """route name -> (path, body of request j) of the openai sweep."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
    chat = {"max_tokens": 32, "messages": [{"role": "user", "content": [image]}]}
    usage = {"stream": True, "stream_options": {"include_usage": True}}
    return {"chat (stream)": ("chat/completions", lambda j: {**chat, **usage, "seed": j}),
            "chat": ("chat/completions", lambda j: {**chat, "seed": j}),
            "completions (stream)": ("completions", lambda j: {"prompt": "Once upon a time",
                                                               "max_tokens": 32, "seed": j, **usage}),
            "images": ("images/generations", lambda j: {"prompt": PROMPT, "seed": j})}


def openai_sweep(port: int, clients: list[int], requests: int, model: str) -> list[dict]:
    """Each route of openai_bodies at each client count: latency, time to first token, req/s, tokens/s."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/images/generations", data=json.dumps(
            {"model": model, "prompt": PROMPT, "seed": 10**6}).encode(), timeout=300) as r:
        png = base64.b64decode(json.loads(r.read())["data"][0]["b64_json"])  # the chat input; a warm-up too
    rows = []
    for name, (route, make) in openai_bodies(png).items():
        for c in clients:
            got, lock = [], threading.Lock()

            def client(i: int) -> None:
                for j in range(requests):
                    r = openai_call(port, route, {**make(i * 1000 + j), "model": model})
                    with lock:
                        got.append(r)

            wall = run_clients(client, c)
            lat = [g[1] for g in got]
            ttft = [g[2] for g in got]

            def q(xs: list, k: int) -> float:
                return 1000 * (statistics.quantiles(xs, n=100)[k - 1] if len(xs) > 1 else xs[0])

            rows.append({"route": name, "clients": c, "requests": len(got), "errors": sum(g[0] != 200 for g in got),
                         "p50_ms": q(lat, 50), "p99_ms": q(lat, 99), "ttft_p50_ms": q(ttft, 50),
                         "ttft_p99_ms": q(ttft, 99), "rps": len(got) / wall,
                         "tok_s": sum(g[3] for g in got) / wall, "stream": "stream" in name})
    return rows


GPUS = 0.0  # serve.gpus_per_replica of every server started (--gpus-per-replica)


def serve(run: Path, port: int, batch: int, replicas: int, exact: bool = False) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "lumo_ray.cli", "serve", "--run", str(run), "--port", str(port),
                          "--replicas", str(replicas), "--set", f"serve.max_batch_size={batch}", "--set", "serve.max_n=1",
                          "--set", f"serve.exact={str(exact).lower()}", "--set", f"serve.gpus_per_replica={GPUS:g}"],
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
    ap.add_argument("--gpus-per-replica", type=float, default=0.0, help="serve.gpus_per_replica (GPU servers)")
    ap.add_argument("--batch", type=int, default=8, help="serve.max_batch_size of the batched and exact settings")
    ap.add_argument("--settings", default="exact,batched,off,openai", help="which settings to sweep (the kill "
                    "phase runs with batched; openai: OpenAI's routes and streaming on a batched server)")
    ap.add_argument("--no-kill", action="store_true", help="skip the kill phase")
    a = ap.parse_args()
    global GPUS
    GPUS = a.gpus_per_replica
    clients = [int(x) for x in a.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="lumo-bench-serve-"))
    run = Path(a.run) if a.run else None
    if run is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_generate_decode import make_tiny_run

        run = make_tiny_run(tmp / "run")
    print(f"# lumo serve load sweep: run {run}, {a.requests} t2i requests per client, {a.replicas} replica(s); "
          f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs")
    if set(a.settings.split(",")) - {"", "openai"}:
        print("| batching | clients | requests | errors | p50 ms | p95 ms | p99 ms | req/s | same as exact |")
        print("|---|---|---|---|---|---|---|---|---|")
    ratio, answers, profiles = {}, {}, {}
    b = a.batch
    settings = {"exact": (f"exact ({b})", b, True), "batched": (f"batched ({b})", b, False), "off": ("off (1)", 1, False)}
    for name, batch, exact in (settings[k] for k in a.settings.split(",") if k and k != "openai"):  # "": kill only
        port = _port()
        p = serve(run, port, batch, a.replicas, exact)
        answers[name] = {}
        try:
            post(port, {"task": "t2i", "prompt": PROMPT, "seed": 10**6})  # warm-up, not counted
            rows = sweep(port, clients, a.requests, answers[name], p)
        finally:
            p.send_signal(2)
            p.communicate(timeout=120)
        for r in rows:
            ref = answers.get(f"exact ({b})", {})
            same = [answers[name][k] == ref.get(k) for k in answers[name] if k[0] == r["clients"]]
            print(f"| {name} | {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
                  f"| {r['p99_ms']:.0f} | {r['rps']:.2f} | {f'{sum(same)}/{len(same)}' if ref else '-'} |")
        profiles[name] = rows
        by = {r["clients"]: r["rps"] for r in rows}
        if 1 in by and 16 in by:
            ratio[name] = by[16] / by[1]
    for name, x in ratio.items():
        print(f"throughput at 16 clients / 1 client, {name}: {x:.2f}x (target with batching: >= 3x)")
    if profiles:
        parts = [n for n, _ in PARTS]
        cols = list(dict.fromkeys([*parts, "other ray / lumo serve", "clients"]))
        print("\nWhere the CPU goes: CPU ms per request of each part (user + system, its processes summed), and how "
              "busy the machine's cores were over the sweep (every process on the machine)")
        print("| batching | clients | req/s | " + " | ".join(cols) + " | all parts | cores busy |")
        print("|---|---|---|" + "---|" * (len(cols) + 2))
        for name, rows in profiles.items():
            for r in rows:
                pr = r["profile"]
                print(f"| {name} | {r['clients']} | {r['rps']:.2f} | " + " | ".join(f"{pr.get(k, 0.0):.0f}" for k in cols)
                      + f" | {sum(v for k, v in pr.items() if k != 'busy'):.0f} | {100 * pr['busy']:.0f} % |")
    if "openai" in a.settings.split(","):
        port = _port()
        p = serve(run, port, b, a.replicas)
        try:
            rows = openai_sweep(port, clients, a.requests, Path(run).name)
        finally:
            p.send_signal(2)
            p.communicate(timeout=120)
        print(f"\n| OpenAI route, batched ({b}) | clients | requests | errors | p50 ms | p99 ms | first token p50 ms "
              "| first token p99 ms | req/s | tokens/s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ttft = (f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f}" if r["stream"] else "- | -")
            toks = f"{r['tok_s']:.1f}" if r["tok_s"] else "-"
            print(f"| {r['route']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.0f} "
                  f"| {r['p99_ms']:.0f} | {ttft} | {r['rps']:.2f} | {toks} |")
    if a.no_kill:
        return
    port = _port()
    p = serve(run, port, b, a.replicas)
    try:
        k = kill_phase(port, 16, a.requests, p)
    finally:
        p.send_signal(2)
        p.communicate(timeout=120)
    print("\n| replica killed | clients | requests | failed at least once | retries | 503 + Retry-After | other failures "
          "| lost | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {'yes' if k['killed'] else 'NO'} | {k['clients']} | {k['requests']} | {k['failed_once']} | {k['retries']} "
          f"| {k['retry_503']} | {k['other_failures']} | {k['lost']} | {k['wall_s']:.1f} |")
    print("\n| /health after the kill | answers | 200 | 503 + Retry-After | other | p50 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    print(f"| every 0.2 s to the end | {k['health_n']} | {k['health_n'] - k['health_503'] - k['health_other']} "
          f"| {k['health_503']} | {k['health_other']} | {k['health_p50_ms']:.0f} | {k['health_max_ms']:.0f} |")


if __name__ == "__main__":
    main()
