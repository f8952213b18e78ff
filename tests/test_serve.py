"""`lumo serve`: a real Ray Serve application on a local Ray, called over HTTP with a real client.

One server (a subprocess, as a user starts it) on a tiny token-LM run: each endpoint, a fixed-seed
answer equal to `lumo generate`'s bytes, every kind of bad input refused with a 4xx naming the field
while the replica goes on serving, the bearer token, and a clean stop on SIGINT.
"""
from __future__ import annotations

import base64
import json
import signal
import socket
import threading
import urllib.error
import urllib.request

import pytest

from lumo_ray.config import ServeConfig
from lumo_ray.generate import TASKS, GenOptions, generate, load_run
from lumo_ray.serving import RequestError, parse_request, respond_batch

from served import TOKEN, lumo_server
from test_generate_decode import make_tiny_run


def call(port: int, path: str, body: bytes | dict | None = None, token: str | None = TOKEN) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST" if data is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with lumo_server(tmp_path_factory.mktemp("serve"), "serve.max_n=2", "serve.max_body_bytes=200000") as srv:
        yield srv


def test_health_and_model_info(server):
    port = server["port"]
    assert call(port, "/health") == (200, {"status": "ok"})
    code, info = call(port, "/v1/model")
    run = load_run(server["run"])
    assert code == 200 and info["token_space_hash"] == run.ts.hash and info["token_space_match"] is True
    assert info["tasks"] == ["t2i", "t2a", "i2t", "a2t", "t2t"] and info["limits"]["max_n"] == 2


def test_fixed_seed_answers_are_lumo_generate_bytes(server, tmp_path):
    port, run = server["port"], load_run(server["run"])
    code, r = call(port, "/v1/generate", {"task": "t2i", "prompt": "two red circles on the left", "seed": 3, "n": 2})
    assert code == 200 and [x["index"] for x in r["results"]] == [0, 1]
    ref = generate(run, "t2i", tmp_path / "t2i", prompt="two red circles on the left", n=2, opts=GenOptions(seed=3),
                   log=lambda *a: None)
    for got, want in zip(r["results"], ref):
        assert got["ids"] == want["ids"]
        assert base64.b64decode(got["png_base64"]) == (tmp_path / "t2i" / f"t2i-{want['index']:03d}.png").read_bytes()
    code, r = call(port, "/v1/generate", {"task": "t2a", "prompt": "one long low beep", "seed": 1})
    ref = generate(run, "t2a", tmp_path / "t2a", prompt="one long low beep", opts=GenOptions(seed=1), log=lambda *a: None)
    assert code == 200 and base64.b64decode(r["results"][0]["wav_base64"]) == (tmp_path / "t2a" / "t2a-000.wav").read_bytes()
    png = (tmp_path / "t2i" / "t2i-000.png").read_bytes()  # media in: a caption out, as `lumo generate --input`
    code, r = call(port, "/v1/generate", {"task": "i2t", "input": base64.b64encode(png).decode(), "seed": 5,
                                         "max_new_tokens": 12, "temperature": 0.8, "top_k": 50, "top_p": 0.9})
    ref = generate(run, "i2t", tmp_path / "i2t", input_path=tmp_path / "t2i" / "t2i-000.png",
                   opts=GenOptions(seed=5, max_text_tokens=12, temperature=0.8, top_k=50, top_p=0.9), log=lambda *a: None)
    assert code == 200 and r["results"][0]["ids"] == ref[0]["ids"] and r["results"][0]["text"] == ref[0].get("text")


def test_concurrent_requests_batched_together_get_their_alone_answers(server):
    """Four requests at once (one replica, serve.max_batch_size 8): they share a batch, and each answer
    equals the one it gets alone (each row has its own seed; float rounding of the batched matmuls
    could in principle flip a draw, far below what one test sees)."""
    port = server["port"]
    bodies = [{"task": "t2i", "prompt": p, "seed": k} for k, p in
              enumerate(["two red circles on the left", "one blue square", "three green triangles at the top", "a"])]
    together: list = [None] * len(bodies)
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(k, call(port, "/v1/generate", bodies[k])))
               for k in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for b, got in zip(bodies, together):
        assert got == call(port, "/v1/generate", b)


def test_a_batch_answers_each_request_as_alone_and_refuses_only_the_bad_one(tmp_path):
    """respond_batch in process (what a replica runs): mixed tasks and options in one batch, one
    undecodable image among them."""
    run = load_run(make_tiny_run(tmp_path / "run"))
    limits = ServeConfig(max_n=2)
    bodies = [{"task": "t2i", "prompt": "two red circles on the left", "seed": 3, "n": 2},
              {"task": "t2i", "prompt": "one blue square", "seed": 4},
              {"task": "t2i", "prompt": "one blue square", "seed": 4, "temperature": 0.7},
              {"task": "i2t", "input": base64.b64encode(b"not a png at all").decode()},
              {"task": "t2a", "prompt": "one long low beep", "seed": 1}]
    reqs = [parse_request(json.dumps(b).encode(), list(TASKS), limits) for b in bodies]
    together = respond_batch(run, reqs)
    assert isinstance(together[3], RequestError) and together[3].field == "input"
    for req, got in zip(reqs, together):
        alone = respond_batch(run, [req])[0]
        assert got == alone if isinstance(got, dict) else str(got) == str(alone)
    assert together[1]["results"][0]["ids"] != together[2]["results"][0]["ids"]  # options are honoured per request


BAD = [  # (body, status, field)
    (b"{not json", 400, "body"),
    (b"[1, 2]", 400, "body"),
    ({"task": "t2x", "prompt": "a"}, 422, "task"),
    ({"task": "t2i"}, 422, "prompt"),
    ({"task": "t2i", "prompt": "a", "colour": "red"}, 422, "colour"),
    ({"task": "i2t", "input": "%%% not base64"}, 422, "input"),
    ({"task": "i2t", "input": base64.b64encode(b"not a png at all").decode()}, 422, "input"),
    ({"task": "a2t", "input": base64.b64encode(b"RIFF....WAVEjunk").decode()}, 422, "input"),
    ({"task": "t2i", "prompt": "a", "n": 3}, 422, "n"),
    ({"task": "t2i", "prompt": "a", "n": "2"}, 422, "n"),
    ({"task": "t2i", "prompt": "a", "temperature": -1}, 422, "temperature"),
    ({"task": "t2i", "prompt": "a", "top_p": 2.0}, 422, "top_p"),
    ({"task": "t2i", "prompt": "a", "max_new_tokens": 10}, 422, "max_new_tokens"),
    ({"task": "i2t", "input": "aGk=", "max_new_tokens": 100000}, 422, "max_new_tokens"),
    ({"task": "t2i", "prompt": "x" * 300000}, 413, "body"),
]


def test_bad_input_is_a_4xx_naming_the_field_and_the_replica_keeps_serving(server):
    port = server["port"]
    for body, status, field in BAD:
        code, r = call(port, "/v1/generate", body)
        assert (code, r["error"]["field"]) == (status, field), (body if isinstance(body, bytes) else str(body)[:80], r)
        assert r["error"]["message"] and "Traceback" not in r["error"]["message"]
    assert call(port, "/v1/nowhere")[0] == 404 and call(port, "/v1/generate")[0] == 405  # GET on a POST endpoint
    code, r = call(port, "/health", token=None)
    assert code == 401 and r["error"]["field"] == "authorization"
    assert call(port, "/health", token="wrong")[0] == 401
    code, r = call(port, "/v1/generate", {"task": "t2i", "prompt": "one blue square in the center"})
    assert code == 200 and r["results"][0]["ok"] is True  # still serving


def test_sigint_stops_the_server_cleanly(server):
    p, port = server["proc"], server["port"]
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-4000:]
    assert "[serve] stopped" in out and "Traceback" not in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
