"""`lumo serve` closed when it says so, bounded, and logged (issue 33), against a real server.

Refusals before anything starts (an empty or unreadable token file, a bind beyond loopback without a
token, an access log that cannot be written) are `lumo serve` subprocesses that exit 2 with one line.
The rest share one server (a subprocess, as tests/test_serve.py starts it) on a tiny token-LM run:
the bearer scheme in any case, a 3.9 MB prompt refused in well under a second without holding a
normal request up, prompts over the token limit or max_len, bodies Python's JSON parser cannot
read, /health while generation requests are queued, the access log, and last a killed model
replica's in-flight request answered 503 with Retry-After.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from lumo_ray.serve_guards import check_binding
from served import TOKEN, lumo_server

MARKER = "zebra-quartz-lantern"  # in prompts: must never reach the access log


def http(port: int, path: str, body: bytes | dict | None = None, auth: str | None = f"Bearer {TOKEN}",
         timeout: float = 120) -> tuple[int, dict, dict, float]:
    """(status, JSON body, headers, seconds) of one request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 method="POST" if data is not None else "GET")
    if auth:
        req.add_header("Authorization", auth)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers), time.perf_counter() - t0


def lumo_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lumo_ray.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120)


def one_line_refusal(p: subprocess.CompletedProcess, *needles: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in p.stdout + err, err
    assert "[ray]" not in p.stdout, "Ray started before the refusal"
    for n in needles:
        assert n in err, err
    return err


def refused_in_process(capsys, argv: list[str], *needles: str) -> tuple[str, str]:
    """`lumo serve ...` through the CLI's main in this process (no interpreter start): exit 2, one line."""
    from lumo_ray.cli import main

    assert main(["serve", *argv]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "[ray]" not in out, (out, err)
    for n in needles:
        assert n in err, err
    return out, err


@pytest.fixture
def fake_run(tmp_path):
    """What `lumo serve` checks before it starts anything: a directory with config.yaml and export/."""
    (tmp_path / "run" / "export").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("{}\n")
    return tmp_path / "run"


def test_an_empty_or_unreadable_token_file_refuses_to_start(fake_run, tmp_path, capsys):
    (tmp_path / "token").write_text("")
    one_line_refusal(lumo_serve("--run", str(fake_run), "--token-file", str(tmp_path / "token")),
                     "token file", str(tmp_path / "token"), "empty", "open to anyone")
    (tmp_path / "token").write_text("  \n\n")
    refused_in_process(capsys, ["--run", str(fake_run), "--token-file", str(tmp_path / "token")], "empty")
    refused_in_process(capsys, ["--run", str(fake_run), "--token-file", str(tmp_path / "missing")],
                       "token file", "cannot read it", "No such file")
    refused_in_process(capsys, ["--run", str(fake_run), "--token-file", str(tmp_path)], "token file", "cannot read it")
    (tmp_path / "token").write_text("two words\n")
    refused_in_process(capsys, ["--run", str(fake_run), "--token-file", str(tmp_path / "token")],
                       "token file", "Authorization header cannot carry")


def test_binding_beyond_loopback_needs_a_token_or_insecure(fake_run, tmp_path, capsys):
    one_line_refusal(lumo_serve("--run", str(fake_run), "--host", "0.0.0.0", "--port", "8123"),
                     "serve.host (0.0.0.0)", "no bearer token", "--token-file", "--insecure")
    # --insecure: the warning comes first, then the start goes on (here to the access-log check, which
    # refuses a log under a regular file: still before Ray starts)
    (tmp_path / "file").write_text("")
    out, _ = refused_in_process(capsys, ["--run", str(fake_run), "--host", "0.0.0.0", "--port", "8123", "--insecure",
                                         "--access-log", str(tmp_path / "file" / "access.log")],
                                "access log", "cannot open it")
    assert out.splitlines()[0] == ("[serve] WARNING: 0.0.0.0:8123 serves every network that reaches port 8123 and "
                                   "no bearer token is set: anyone there can generate (--insecure)")
    assert check_binding("0.0.0.0", 80, "t0ken", False) == ""  # a token: no warning
    assert check_binding("127.0.0.1", 80, "", False) == check_binding("::1", 80, "", False) == \
        check_binding("localhost", 80, "", False) == ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with lumo_server(tmp_path_factory.mktemp("serve_security"), "serve.max_n=2",
                     "serve.max_prompt_tokens=1000") as srv:
        yield {**srv, "log": srv["run"] / "serve" / "access.log"}


def test_bearer_scheme_is_case_insensitive_and_the_token_exact(server):
    port = server["port"]
    for auth in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"bEaReR   {TOKEN} "):
        assert http(port, "/health", auth=auth)[:2] == (200, {"status": "ok"}), auth
    for auth in (None, TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", f"Bearer{TOKEN}"):
        code, body, _, _ = http(port, "/health", auth=auth)
        assert code == 401 and body["error"]["field"] == "authorization", auth


def test_an_oversize_prompt_is_a_fast_422_and_holds_no_other_request_up(server):
    port = server["port"]
    big = json.dumps({"task": "t2i", "prompt": MARKER + "x" * 3_900_000}).encode()  # under the 4 MiB body limit
    for _ in range(2):
        code, body, _, secs = http(port, "/v1/generate", big)
        assert (code, body["error"]["field"]) == (422, "prompt"), body
        assert "serve.max_prompt_chars" in body["error"]["message"]
        assert secs < 0.5, f"{secs:.2f} s"
    normal = {"task": "t2i", "prompt": "two red circles on the left", "seed": 7}
    http(port, "/v1/generate", normal)  # warm
    alone = statistics.median(http(port, "/v1/generate", normal)[3] for _ in range(3))
    beside = []
    for _ in range(2):  # the better of two tries: the 2-core machine is shared with other work
        got: dict = {}
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, http(port, "/v1/generate", big)))
                   for k in range(6)]
        for t in threads:
            t.start()
        code, _, _, secs = http(port, "/v1/generate", normal)
        for t in threads:
            t.join()
        assert code == 200 and [got[k][0] for k in range(6)] == [422] * 6
        beside.append(secs)
    # held up = queued behind six generations (>= 6x alone); receiving and refusing 23 MB of bodies on
    # the same 2 cores costs the normal request up to ~0.2 s (CI measured 0.38 s beside vs 0.185 alone)
    assert min(beside) <= 2 * alone + 0.3, f"alone {alone:.3f} s, beside six 3.9 MB prompts {beside} s"


def test_a_prompt_over_the_token_limit_or_max_len_is_a_422_naming_prompt(server):
    port = server["port"]
    for prompt, why in (("a " * 1100, "serve.max_prompt_tokens"), ("a " * 460, "token_lm.seq.max_len of 512"),
                        ("x" * 4001, "serve.max_prompt_chars")):
        code, body, _, _ = http(port, "/v1/generate", {"task": "t2a", "prompt": prompt})
        assert (code, body["error"]["field"]) == (422, "prompt") and why in body["error"]["message"], body
    assert http(port, "/v1/generate", {"task": "t2i", "prompt": "a " * 300, "seed": 1})[0] == 200  # fits


@pytest.mark.parametrize("body,why", [
    (b'{"task": "t2i", "prompt": "a lone \\ud800 surrogate"}', "lone surrogate"),
    (b'{"task": "t2i", "prompt": "ok", "\\udfff": 1}', "lone surrogate"),
    (b'{"task": "t2i", "prompt": "a", "seed": ' + b"7" * 5000 + b"}", "over 4,300 digits"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nested deeper"),
    (b'{"task": "t2i", "prompt": "\xff\xfe caf\xe9"}', "not JSON"),
])
def test_bodies_the_parser_cannot_read_are_400_never_500(server, body, why):
    code, r, _, _ = http(server["port"], "/v1/generate", body)
    assert code == 400 and set(r["error"]) == {"field", "message", "status"} and why in r["error"]["message"], r


def test_health_answers_while_generation_requests_are_queued(server):
    """40 requests of 2 samples each: 16 in flight at the one replica (2 x serve.max_batch_size), the
    rest queued; /health answers at once from the Gateway, not behind them."""
    port, n = server["port"], 40
    done: list = []
    threads = [threading.Thread(target=lambda k=k: done.append(
        http(port, "/v1/generate", {"task": "t2i", "prompt": f"{MARKER} {k}", "seed": k, "n": 2})[0]))
        for k in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    answers = []
    for _ in range(3):
        pending = n - len(done)
        code, _, _, secs = http(port, "/health")
        answers.append((pending, code, secs))
    for t in threads:
        t.join()
    assert answers[0][0] > 16, f"only {answers[0][0]} requests pending: none queued behind the replica's 16"
    assert all(code == 200 and secs < 1.0 for _, code, secs in answers), answers
    assert done == [200] * n


def test_every_request_is_in_the_access_log_without_token_or_body(server):
    port = server["port"]
    code, _, headers, _ = http(port, "/v1/generate", {"task": "t2i", "prompt": MARKER, "seed": 2})
    rid = {k.lower(): v for k, v in headers.items()}["x-request-id"]
    assert http(port, "/v1/model", auth=f"Bearer wrong-{TOKEN}")[0] == 401
    assert http(port, "/v1/nowhere?token=" + TOKEN)[0] == 404
    assert http(port, "/v1/generate", b'{"prompt": "' + MARKER.encode())[0] == 400
    assert http(port, "/v1/generate", {"task": "t2i", "prompt": MARKER * 300})[0] == 422
    assert http(port, "/health")[0] == 200
    lines = server["log"].read_text().splitlines()
    text = "\n".join(lines)
    assert TOKEN not in text and MARKER not in text and "xxxx" not in text
    line = next(x for x in lines if x.endswith(f"id={rid}"))
    assert f'"POST /v1/generate" {code} ' in line and line.split()[-2].endswith("ms")
    for status, route in ((401, '"GET /v1/model"'), (404, '"GET /v1/nowhere"'), (422, '"POST /v1/generate"'),
                          (400, '"POST /v1/generate"'), (200, '"GET /health"')):
        assert any(f"{route} {status} " in x for x in lines), (status, route)
    assert all(len(x.split()) == 7 and x.split()[-1].startswith("id=") for x in lines), lines[:5]


def test_a_lost_replica_answers_its_in_flight_requests_503_with_retry_after(server):
    """SIGKILL the model replica while 8 clients keep it busy: the requests on it are answered 503 +
    Retry-After in the JSON error format (not a plain-text 500), and /health keeps answering at once
    while Serve restarts it."""
    import psutil

    port, stop, got = server["port"], threading.Event(), []

    def client(k: int) -> None:  # one request after another until one fails (or the test is done)
        for j in range(1000):
            try:
                got.append(http(port, "/v1/generate", {"task": "t2i", "prompt": "one blue square",
                                                       "seed": 100 * k + j, "n": 2}))
            except OSError:  # one still waiting for the new replica when the server stops (teardown)
                return
            if got[-1][0] != 200 or stop.is_set():
                return

    for k in range(8):
        threading.Thread(target=client, args=(k,), daemon=True).start()
    deadline = time.time() + 60
    while len(got) < 8 and time.time() < deadline:  # the replica is busy with the next ones now
        time.sleep(0.1)
    replicas = [c for c in psutil.Process(server["proc"].pid).children(recursive=True)
                if "ServeReplica:lumo:Generator" in " ".join(c.cmdline())]
    assert len(replicas) == 1
    replicas[0].kill()
    deadline = time.time() + 60
    while time.time() < deadline and not any(code == 503 for code, *_ in got):
        time.sleep(0.2)
    stop.set()
    failed = [(code, body, headers) for code, body, headers, _ in got if code != 200]
    assert failed and all(code == 503 for code, _, _ in failed), [code for code, *_ in got]
    for code, body, headers in failed:
        assert body["error"]["status"] == 503 and body["error"]["field"] == "server", body
        assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) > 0
    code, body, headers, secs = http(port, "/health")
    assert secs < 1.0 and (code == 200 or (code == 503 and "retry-after" in {k.lower() for k in headers})), (code, body)
