"""OpenAI's API on `lumo serve`, called with the official `openai` client against a real server.

One server (a subprocess on a tiny token-LM run, tests/served.py) for the module: the models list,
images and speech with `lumo generate`'s bytes for a seed, chat with an image and with an audio input
(i2t / a2t: `lumo generate --input`'s text), chat and completions on text (t2t), streaming (chunks
arrive while the replica generates, and join to the non-streamed answer of the same seed, with which
it shares a batch), a wrong token (401), bad fields (400 / 404 naming the param), and the server
healthy after all of it.
"""
from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from lumo_ray.generate import GenOptions, generate, load_run  # noqa: E402
from served import TOKEN, lumo_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with lumo_server(tmp_path_factory.mktemp("openai"), "serve.max_n=2") as srv:
        yield {**srv, "lm": load_run(srv["run"])}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=TOKEN, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def media(server, tmp_path_factory):
    """What `lumo generate` writes for two captions: the references of images / speech, and the inputs of
    chat with an image / audio."""
    d, lm = tmp_path_factory.mktemp("ref"), server["lm"]
    quiet = {"log": lambda *a: None}
    generate(lm, "t2i", d / "t2i", prompt="two red circles on the left", n=2, opts=GenOptions(seed=3), **quiet)
    generate(lm, "t2a", d / "t2a", prompt="one long low beep", opts=GenOptions(seed=1), **quiet)
    return {"png": [(d / "t2i" / f"t2i-00{i}.png").read_bytes() for i in range(2)],
            "wav": (d / "t2a" / "t2a-000.wav").read_bytes(), "dir": d}


def _text(lm, task: str, d, **kw) -> str:
    opts = GenOptions(**{k: v for k, v in kw.items() if k in ("seed", "max_text_tokens", "temperature", "top_p")})
    rec = generate(lm, task, d, opts=opts, log=lambda *a: None,
                   **{k: v for k, v in kw.items() if k in ("prompt", "input_path")})
    return rec[0]["text"]


def test_models_lists_the_run(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["run"] and models[0].owned_by == "lumo"
    assert client.models.retrieve("run").id == "run"


def test_images_and_speech_are_lumo_generate_bytes(client, model, media):
    r = client.images.generate(model=model, prompt="two red circles on the left", n=2, response_format="b64_json",
                               extra_body={"seed": 3})
    assert [base64.b64decode(x.b64_json) for x in r.data] == media["png"]
    wav = client.audio.speech.create(model=model, voice="alloy", input="one long low beep", response_format="wav",
                                     extra_body={"seed": 1})
    assert wav.content == media["wav"]


def test_chat_with_an_image_or_audio_input_is_lumo_generate_input(client, model, server, media, tmp_path):
    lm = server["lm"]
    (tmp_path / "in.png").write_bytes(media["png"][0])
    (tmp_path / "in.wav").write_bytes(media["wav"])
    url = "data:image/png;base64," + base64.b64encode(media["png"][0]).decode()
    r = client.chat.completions.create(model=model, seed=5, max_tokens=12, temperature=0.8, top_p=0.9, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                     {"type": "image_url", "image_url": {"url": url}}]}])
    want = _text(lm, "i2t", tmp_path / "i2t", input_path=tmp_path / "in.png", seed=5, max_text_tokens=12,
                 temperature=0.8, top_p=0.9)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    audio = {"data": base64.b64encode(media["wav"]).decode(), "format": "wav"}
    r = client.chat.completions.create(model=model, seed=2, messages=[
        {"role": "user", "content": [{"type": "input_audio", "input_audio": audio}]}])
    assert r.choices[0].message.content == _text(lm, "a2t", tmp_path / "a2t", input_path=tmp_path / "in.wav", seed=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_text_chat_and_completions_are_lumo_generate_t2t(client, model, server, tmp_path):
    lm = server["lm"]
    want = _text(lm, "t2t", tmp_path / "a", prompt="Once upon a time", seed=1, max_text_tokens=8)
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, seed=1)
    assert r.object == "text_completion" and r.choices[0].text == want
    r = client.chat.completions.create(model=model, max_tokens=8, seed=1,
                                       messages=[{"role": "user", "content": "Once upon a time"}])
    assert r.choices[0].message.content == want
    chunks = list(client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, seed=1,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_arrives_token_by_token_and_joins_to_the_answer(client, model, media):
    """A stream and the same request unstreamed, sent together (they may share a batch): the chunks come
    while it generates, and join to the unstreamed content, choice by choice."""
    url = "data:image/png;base64," + base64.b64encode(media["png"][1]).decode()
    ask = dict(model=model, seed=11, n=2, max_tokens=48, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    whole: dict = {}
    t = threading.Thread(target=lambda: whole.setdefault("r", client.chat.completions.create(**ask)))
    t.start()
    got, times, finish = {0: "", 1: ""}, [], {}
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ask)
    for chunk in stream:
        times.append(time.perf_counter())
        for c in chunk.choices:
            got[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if not chunk.choices:
            usage = chunk.usage
    t.join()
    r = whole["r"]
    assert got == {c.index: c.message.content for c in r.choices} and all(got.values())
    assert finish == {c.index: c.finish_reason for c in r.choices}
    assert usage.completion_tokens == r.usage.completion_tokens
    assert len(times) > 10 and times[-1] - times[0] > 0.02, (len(times), times[-1] - times[0])


def test_a_wrong_token_is_a_401_in_openai_json(server, model):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


PNG_URL = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
BAD = [  # (route, body, status, param)
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ("chat/completions", {"messages": [{"role": "user", "content": [PNG_URL]}]}, 400,
     "messages[0].content[0].image_url.url"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}}]}]}, 400,
     "messages[0].content[0].input_audio.format"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]}, 400,
     "messages[0].content[0].image_url.url"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "tools"),
    ("chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("images/generations", {"prompt": "a", "response_format": "url"}, 400, "response_format"),
    ("images/generations", {"prompt": "a", "size": "1024x1024"}, 400, "size"),
    ("audio/speech", {"input": "a", "voice": "alloy", "response_format": "mp3"}, 400, "response_format"),
    ("audio/speech", {"input": "x" * 5000, "voice": "alloy"}, 400, "input"),
    ("audio/speech", {"input": "a", "voice": "alloy", "speed": 2}, 400, "speed"),
]


def _post(port: int, route: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{route}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_fields_are_openai_errors_naming_the_param_and_the_server_stays_healthy(client, server, model):
    for route, body, status, param in BAD:
        code, r = _post(server["port"], route, {"model": model, **body})
        assert (code, r["error"]["param"]) == (status, param), (route, str(body)[:100], r)
        assert set(r["error"]) == {"message", "type", "param", "code"} and r["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:  # as the client sees one
        client.chat.completions.create(model=model, top_p=3, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and e.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{server['port']}/health",
                                                       headers={"Authorization": f"Bearer {TOKEN}"})) as r:
        assert r.status == 200
    r = client.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content is not None
