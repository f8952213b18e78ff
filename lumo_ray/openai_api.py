"""OpenAI's API on `lumo serve`, without Ray or HTTP: a request body of one of OpenAI's routes checked
field by field into the server's own generation request (lumo_ray/serving.py: GenRequest), and the
answer (or its growing text) written back as OpenAI's JSON. servers/generate.py puts this beside
/v1/generate: same replicas, same batches, same bearer token.

    GET  /v1/models, /v1/models/{id}  the one model: the run
    POST /v1/chat/completions         image_url (data: URL) -> i2t, input_audio (wav) -> a2t, text -> t2t
    POST /v1/completions              text -> t2t
    POST /v1/images/generations       t2i, b64_json PNGs
    POST /v1/audio/speech             t2a, WAV bytes

A generation is /v1/generate's (so `lumo generate`'s bytes for a seed; default seed 0, not random).
Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}`, the param named as the request
spells it (`messages[0].content[1].image_url.url`); bad input is a 400, where /v1/generate says 422.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .config import ServeConfig
from .generate import GUIDANCE_MAX, GenOptions
from .generate_text import cut_at_stop
from .serving import GenRequest, RequestError, number, read_body

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/images/generations": "image",
          "/v1/audio/speech": "speech"}
"""POST routes -> the kind of request; GET /v1/models (and /v1/models/{id}) besides."""
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4
"""Stop strings per request (OpenAI's limit)."""


class OpenAIError(Exception):
    """An answer in OpenAI's error format: HTTP `status`, the request `param` at fault (None: none is)."""

    def __init__(self, status: int, param: Optional[str], message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.param, self.message, self.code = status, param, message, code

    def body(self) -> dict:
        kind = ("server_error" if self.status >= 500 else "authentication_error" if self.status == 401 else
                "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def from_request_error(status: int, body: dict, fields: Optional[dict] = None) -> OpenAIError:
    """A /v1/generate error answer (status, {"error": {field, message}}) as OpenAI's, the field renamed to
    the route's parameter (`fields`); a 422 becomes OpenAI's 400."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    name = err.get("field")
    param = None if name in (None, "server", "timeout", "authorization", "path", "method") else \
        (fields or {}).get(name, name)
    code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 503: "overloaded",
            504: "timeout"}.get(status)
    return OpenAIError(400 if status == 422 else status, param, str(err.get("message", "request failed")), code)


@dataclass
class OpenAIRequest:
    """One OpenAI request, checked: what to generate (`gen`) and how to answer it."""
    route: str
    """chat, completion, image or speech."""
    gen: GenRequest
    model: str
    stream: bool = False
    include_usage: bool = False
    fields: dict = field(default_factory=dict)
    """/v1/generate's field names -> this request's parameters (an error from a replica names the latter)."""


@dataclass
class Served:
    """What the Gateway asks a replica once: the model's id, its tasks and what its answers look like."""
    model: str
    tasks: list
    created: int = 0
    """Unix time of the run's export (GET /v1/models)."""
    image_size: int = 0
    """Side of a generated image in pixels (0: no images)."""
    fingerprint: str = ""
    """system_fingerprint: the run's token-space hash, which fixes what the ids mean."""


# -- parsing ------------------------------------------------------------------------------------

def _err(param: Optional[str], message: str, status: int = 400, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(status, param, message, code)


def _clip(v: Any, n: int = 60) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[:n] + "..."


def _num(d: dict, key: str, kind: type, default: Any, lo: float, hi: float) -> Any:
    try:
        return number(d, key, kind, default, lo, hi)
    except RequestError as e:
        raise _err(key, e.message) from None


def _fields(d: dict, accepted: tuple, neutral: dict) -> None:
    """An unknown parameter is a 400 naming it; a known one this server cannot honour is accepted only at
    its neutral value (`neutral`: name -> the values that change nothing)."""
    for k in d:
        if k in neutral:
            if d[k] not in neutral[k]:
                raise _err(k, f"not supported by this server; leave it out (or at {_clip(neutral[k][0])})")
        elif k not in accepted:
            raise _err(k, f"unknown parameter; this route takes: {', '.join(accepted)}", code="unknown_parameter")


def _model(d: dict, served: Served, required: bool) -> str:
    m = d.get("model")
    if m is None and not required:
        return served.model
    if not isinstance(m, str) or not m:
        raise _err("model", f"the model's id is required: {json.dumps(served.model)} (GET /v1/models)")
    if m != served.model:
        raise _err("model", f"the model {_clip(m)} does not exist: this server has {json.dumps(served.model)}",
                   404, "model_not_found")
    return m


def _task(task: str, served: Served, param: str, what: str) -> None:
    if task not in served.tasks:
        raise _err(param, f"this run cannot {what} (it serves {', '.join(served.tasks)}; {task} is not among them)")


def _text_param(d: dict, key: str, limits: ServeConfig) -> str:
    v = d.get(key)
    if isinstance(v, list) and len(v) == 1:  # completions take a list of prompts: one here
        v = v[0]
    if isinstance(v, str) and len(v) > limits.max_prompt_chars:  # before anything reads it
        raise _err(key, f"{len(v)} characters, over the {limits.max_prompt_chars}-character limit "
                        f"(serve.max_prompt_chars)")
    if not isinstance(v, str) or not v.strip():
        raise _err(key, "a non-empty string is required")
    return v


def _sampling(d: dict, limits: ServeConfig, text: bool) -> GenOptions:
    """seed, temperature (0: greedy), top_p, top_k (an extension, as vLLM's), max_tokens /
    max_completion_tokens (text), guidance_scale (an extension; media)."""
    opts = GenOptions(seed=_num(d, "seed", int, 0, 0, 2**31 - 1),
                      top_p=_num(d, "top_p", float, 1.0, 1e-3, 1.0),
                      top_k=_num(d, "top_k", int, 0, 0, 100_000))
    temp = _num(d, "temperature", float, 1.0, 0.0, 2.0)
    if temp == 0.0:
        opts.greedy = True  # OpenAI's temperature 0: the most likely token at each step
    else:
        opts.temperature = temp
    if text:
        if "max_tokens" in d and "max_completion_tokens" in d:
            raise _err("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        key = "max_completion_tokens" if "max_completion_tokens" in d else "max_tokens"
        if key in d:
            opts.max_text_tokens = _num(d, key, int, 0, 1, limits.max_new_tokens)
    elif "guidance_scale" in d:
        opts.guidance_scale = _num(d, "guidance_scale", float, 1.0, 1.0, GUIDANCE_MAX)
    return opts


def _stop(d: dict) -> tuple:
    v = d.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP or \
            not all(isinstance(s, str) and s for s in stops):
        raise _err("stop", f"a non-empty string or a list of 1 to {MAX_STOP} of them, got {_clip(v)}")
    return tuple(stops)


def _stream(d: dict) -> tuple[bool, bool]:
    stream = d.get("stream", False)
    if not isinstance(stream, bool):
        raise _err("stream", f"must be true or false, got {_clip(stream)}")
    opts = d.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise _err("stream_options", "only with stream: true")
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or \
            not isinstance(opts.get("include_usage", False), bool):
        raise _err("stream_options", f"takes include_usage (true / false), got {_clip(opts)}")
    return stream, opts.get("include_usage", False)


_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*);base64,(?P<data>.*)", re.S)


def _b64(raw: Any, param: str, what: str) -> bytes:
    if not isinstance(raw, str) or not raw:
        raise _err(param, f"{what} in base64 is required")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise _err(param, "not valid base64") from None


def _media_part(part: dict, param: str) -> tuple[str, bytes, str]:
    """(task, bytes, param of the bytes) of an image_url or input_audio content part."""
    if part["type"] == "image_url":
        img = part.get("image_url")
        url = img.get("url") if isinstance(img, dict) else img
        where = f"{param}.image_url.url" if isinstance(img, dict) else f"{param}.image_url"
        m = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
        if m is None or not (m.group("mime") or "image/").startswith("image/"):
            raise _err(where, "a data: URL with the image's bytes in base64 (data:image/png;base64,...) is required: "
                              "this server fetches no URLs")
        return "i2t", _b64(m.group("data"), where, "an image"), where
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        raise _err(f"{param}.input_audio", "an object {data: base64 WAV bytes, format: \"wav\"} is required")
    if audio.get("format") != "wav":
        raise _err(f"{param}.input_audio.format", f"\"wav\" is the format this server reads, got "
                                                  f"{_clip(audio.get('format'))}")
    return "a2t", _b64(audio.get("data"), f"{param}.input_audio.data", "the WAV file"), f"{param}.input_audio.data"


def _messages(msgs: Any) -> tuple[str, Optional[tuple[str, bytes, str]]]:
    """The messages' text (in order, a blank line between messages) and their one media input, if any."""
    if not isinstance(msgs, list) or not msgs:
        raise _err("messages", "a non-empty list of messages is required")
    texts, media = [], []
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err(p, f"a message object {{role, content}} is required, got {_clip(m)}")
        if m.get("role") not in ROLES:
            raise _err(f"{p}.role", f"one of {', '.join(ROLES)}, got {_clip(m.get('role'))}")
        unknown = sorted(set(m) - {"role", "content", "name"})
        if unknown:
            raise _err(f"{p}.{unknown[0]}", "not supported by this server (no tools or function calls)")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise _err(f"{p}.content", f"a string or a list of content parts is required, got {_clip(content)}")
        for j, part in enumerate(parts):
            q = f"{p}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise _err(f"{q}.text", "a string is required")
                if part["text"]:
                    texts.append(part["text"])
            elif kind in ("image_url", "input_audio"):
                media.append(_media_part(part, q))
            else:
                raise _err(f"{q}.type", f"text, image_url or input_audio, got {_clip(kind)}")
    if len(media) > 1:
        raise _err(media[1][2], "one image or audio input per request: the run captions one (i2t / a2t)")
    return "\n\n".join(texts), (media[0] if media else None)


def parse_openai(route: str, body: bytes, served: Served, limits: ServeConfig) -> OpenAIRequest:
    """A body of an OpenAI route ("chat", "completion", "image", "speech") -> OpenAIRequest, or
    OpenAIError naming the first bad parameter. Nothing here reads media: a file the codecs cannot
    decode is the replica's 400 (param: where the bytes were)."""
    try:
        d = read_body(body, limits)
    except RequestError as e:
        raise from_request_error(e.status, e.body()) from None
    d = {k: v for k, v in d.items() if v is not None}  # null: left out, as OpenAI reads it
    if route in ("chat", "completion"):
        return _parse_text(route, d, served, limits)
    if route == "image":
        _fields(d, ("prompt", "model", "n", "response_format", "size", "seed", "guidance_scale", "user"),
                {"quality": ("auto", "standard"), "output_format": ("png",), "style": ("natural", "vivid")})
        model = _model(d, served, required=False)
        _task("t2i", served, "prompt", "generate images")
        prompt = _text_param(d, "prompt", limits)
        if d.get("response_format", "b64_json") != "b64_json":
            raise _err("response_format", "b64_json is what this server answers (it keeps no files to link to)")
        size = f"{served.image_size}x{served.image_size}"
        if d.get("size", size) not in (size, "auto"):
            raise _err("size", f"this run generates {size} images: give {size} or auto, got {_clip(d.get('size'))}")
        gen = GenRequest("t2i", prompt, None, _num(d, "n", int, 1, 1, limits.max_n), _sampling(d, limits, False))
        return OpenAIRequest("image", gen, model)
    if route == "speech":
        _fields(d, ("input", "model", "voice", "response_format", "seed", "guidance_scale", "user"),
                {"speed": (1, 1.0), "instructions": ("",), "stream_format": ("audio",)})
        model = _model(d, served, required=False)
        _task("t2a", served, "input", "generate audio")
        prompt = _text_param(d, "input", limits)
        if not isinstance(d.get("voice", ""), (str, dict)):
            raise _err("voice", "a voice name (this run has one voice: any name is taken)")
        if d.get("response_format", "wav") != "wav":
            raise _err("response_format", f"wav is what this server writes, got {_clip(d.get('response_format'))}")
        gen = GenRequest("t2a", prompt, None, 1, _sampling(d, limits, False))
        return OpenAIRequest("speech", gen, model, fields={"prompt": "input"})
    raise ValueError(f"unknown OpenAI route {route!r}")


def _parse_text(route: str, d: dict, served: Served, limits: ServeConfig) -> OpenAIRequest:
    common = ("model", "n", "seed", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop",
              "stream", "stream_options", "user")
    neutral = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False, 0),
               "logit_bias": ({},)}
    if route == "chat":
        _fields(d, ("messages",) + common, neutral)
    else:
        _fields(d, ("prompt",) + common, {**neutral, "echo": (False,), "best_of": (1,), "suffix": ("",)})
    model = _model(d, served, required=True)
    if route == "chat":
        text, media = _messages(d.get("messages"))
        task, prompt, data = (media[0], None, media[1]) if media else ("t2t", text, None)
        if media:
            _task(task, served, media[2], f"read {'images' if task == 'i2t' else 'audio'}")
        else:
            if len(text) > limits.max_prompt_chars:
                raise _err("messages", f"{len(text)} characters, over the {limits.max_prompt_chars}-character limit "
                                       f"(serve.max_prompt_chars)")
            if not text.strip():
                raise _err("messages", "no text and no image or audio input: nothing to answer")
            _task("t2t", served, "messages", "generate text from text (no t2t task); send an image or audio input")
        fields = {"prompt": "messages", "input": media[2] if media else "messages"}
    else:
        _task("t2t", served, "prompt", "generate text from text (no t2t task)")
        task, prompt, data = "t2t", _text_param(d, "prompt", limits), None
        fields = {}
    stream, usage = _stream(d)
    opts = _sampling(d, limits, True)
    opts.stop = _stop(d)  # t2t ends a row at one; a caption (i2t / a2t) is cut at it
    gen = GenRequest(task, prompt, data, _num(d, "n", int, 1, 1, limits.max_n), opts, stream=stream)
    fields["max_new_tokens"] = "max_completion_tokens" if "max_completion_tokens" in d else "max_tokens"
    return OpenAIRequest(route, gen, model, stream, usage, fields)


# -- answers ------------------------------------------------------------------------------------

def models_list(served: Served) -> dict:
    return {"object": "list", "data": [model_card(served)]}


def model_card(served: Served) -> dict:
    return {"id": served.model, "object": "model", "created": served.created, "owned_by": "lumo"}


def new_id(route: str) -> str:
    return f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def _finish(req: OpenAIRequest, result: dict) -> tuple[str, str]:
    """(text, finish_reason) of one result: t2t's own (generation stops at a stop string); a caption
    (i2t / a2t) cut at a stop string ("stop"), or its span ran to max_tokens ("length"), or it ended with
    its end token ("stop")."""
    if "finish_reason" in result:
        return result.get("text") or "", result["finish_reason"] or "stop"
    text, hit = cut_at_stop(result.get("text") or "", req.gen.opts.stop)
    capped = result["check"]["length"] >= req.gen.opts.max_text_tokens
    return text, "length" if capped and hit is None else "stop"


def _usage(answer: dict) -> dict:
    done = sum(len(r["ids"]) for r in answer["results"])  # the end token counted, as a generated token
    return {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": done,
            "total_tokens": answer["prompt_tokens"] + done}


def text_response(req: OpenAIRequest, answer: dict, rid: str, served: Served, created: int) -> dict:
    """chat.completion or text_completion of a generation answer (serving.respond_batch's)."""
    choices = []
    for r in answer["results"]:
        text, finish = _finish(req, r)
        c = {"index": r["index"], "logprobs": None, "finish_reason": finish}
        c.update({"message": {"role": "assistant", "content": text}} if req.route == "chat" else {"text": text})
        choices.append(c)
    return {"id": rid, "object": "chat.completion" if req.route == "chat" else "text_completion", "created": created,
            "model": req.model, "system_fingerprint": served.fingerprint, "choices": choices, "usage": _usage(answer)}


def _decoded(answer: dict, key: str) -> list[str]:
    bad = [r for r in answer["results"] if not r.get(key)]
    if bad:
        raise OpenAIError(500, None, f"sample {bad[0]['index']} did not decode: {bad[0]['check'].get('error', '')}",
                          "decode_failed")
    return [r[key] for r in answer["results"]]


def images_response(answer: dict, created: int) -> dict:
    return {"created": created, "data": [{"b64_json": b} for b in _decoded(answer, "png_base64")]}


def speech_bytes(answer: dict) -> bytes:
    return base64.b64decode(_decoded(answer, "wav_base64")[0])


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"


class TextStream:
    """The server-sent events of one streamed chat / completion request: a chunk per text delta of a row
    (the replica's: stop strings already honoured), then each row's finish chunk, the usage chunk
    (stream_options.include_usage) and `data: [DONE]`. At the end each row sends what its final text
    (the non-streamed answer's) holds beyond what was sent, so the joined deltas equal the non-streamed
    content."""

    def __init__(self, req: OpenAIRequest, rid: str, served: Served, created: int):
        self.req, self.rid, self.served, self.created = req, rid, served, created
        self.sent: dict = {}  # row -> the text sent so far

    def _chunk(self, choices: list, usage: Any = False) -> str:
        chat = self.req.route == "chat"
        obj = {"id": self.rid, "object": "chat.completion.chunk" if chat else "text_completion",
               "created": self.created, "model": self.req.model, "system_fingerprint": self.served.fingerprint,
               "choices": choices}
        if self.req.include_usage:
            obj["usage"] = usage if usage is not False else None
        return sse(obj)

    def _choice(self, row: int, text: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict:
        if self.req.route == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            return {"index": row, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": row, "text": text or "", "logprobs": None, "finish_reason": finish}

    def start(self) -> str:
        """The assistant role of each choice (chat), before any text."""
        if self.req.route != "chat":
            return ""
        return "".join(self._chunk([self._choice(i, None, role=True)]) for i in range(self.req.gen.n))

    def text(self, row: int, delta: str) -> str:
        self.sent[row] = self.sent.get(row, "") + delta
        return self._chunk([self._choice(row, delta)])

    def done(self, answer: dict) -> str:
        out = []
        for r in answer["results"]:
            row = r["index"]
            text, finish = _finish(self.req, r)
            sent = self.sent.get(row, "")
            rest = text[len(sent):] if text.startswith(sent) else ""  # (a decoded prefix is a prefix: always)
            if rest:
                out.append(self._chunk([self._choice(row, rest)]))
            out.append(self._chunk([self._choice(row, None, finish)]))
        if self.req.include_usage:
            out.append(self._chunk([], _usage(answer)))
        out.append(sse("[DONE]"))
        return "".join(out)

    def error(self, err: OpenAIError) -> str:
        """A failure after the stream began (its status is sent): an error event, as OpenAI sends one."""
        return sse(err.body())


def now() -> int:
    return int(time.time())
