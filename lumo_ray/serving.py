"""What `lumo serve` answers, without Ray or HTTP: a request body checked field by field, the generation
it asks for, and the JSON that goes back. servers/generate.py puts this behind Ray Serve.

A generation is `lumo generate` in memory: the same prompt building, constrained decoding and media
files, so for one seed a response carries the bytes `lumo generate` writes (base64); a batch of
requests is generated together, each row with its own seed. Bad input is a `RequestError` naming the
field, with the HTTP status it maps to; it never reaches the model. Oversize input is refused before
anything large is tokenized (serve.max_prompt_chars), and no body, however malformed, is a 500.
The server's guards (token file, bind check, bearer match, access log) are lumo_ray/serve_guards.py;
OpenAI's routes map onto the same GenRequest (lumo_ray/openai_api.py), streamed text through
respond_batch's on_text.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .config import ServeConfig
from .generate import TARGET, TASKS, GenOptions, Run

MEDIA_SUFFIX = {"i2t": ".png", "a2t": ".wav"}
FIELDS = ("task", "prompt", "input", "n", "seed", "temperature", "top_k", "top_p", "max_new_tokens", "guidance_scale")


class RequestError(ValueError):
    """A request the server refuses: `status` (4xx), the `field` at fault, and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message, "status": self.status}}


@dataclass
class GenRequest:
    task: str
    prompt: Optional[str]
    media: Optional[bytes]
    n: int
    opts: GenOptions
    stream: bool = False
    """A text answer wanted as it grows (respond_batch's on_text); the answer is the same either way."""


def _clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def number(d: dict, key: str, kind: type, default: Any, lo: float, hi: float) -> Any:
    """d[key] (default when absent) checked to be an int / finite float in [lo, hi], or a 422 naming key."""
    v = d.get(key, default)
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise RequestError(422, key, f"must be an integer, got {_clip(json.dumps(v))}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise RequestError(422, key, f"must be a finite number, got {_clip(json.dumps(v))}")
    if not lo <= v <= hi:
        raise RequestError(422, key, f"must be in [{lo}, {hi}], got {_clip(str(v))}")
    return kind(v)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(d: dict) -> Optional[str]:
    """The top-level field holding a string with a lone surrogate (a \\ud800-\\udfff escape JSON lets
    through, which is no Unicode text: it cannot be tokenized or written back), "body" when a key has one."""
    def bad(s: str) -> bool:
        return not s.isascii() and _SURROGATE.search(s) is not None  # isascii: a fast pass over most strings

    for key, value in d.items():
        if bad(key):
            return "body"
        stack = [value]
        while stack:  # iterative: the parser already bounded the depth, this walk adds no recursion
            v = stack.pop()
            if isinstance(v, str) and bad(v):
                return key
            if isinstance(v, dict):
                if any(bad(k) for k in v):
                    return key
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    return None


def read_body(body: bytes, limits: ServeConfig) -> dict:
    """A request body as a JSON object, or RequestError: over serve.max_body_bytes (413), not JSON this
    server reads or not an object, a lone surrogate anywhere (400)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, "body", f"{len(body)} bytes, over the {limits.max_body_bytes}-byte limit")
    try:
        d = json.loads(body)
    except RecursionError:
        raise RequestError(400, "body", "not JSON this server reads: nested deeper than its parser goes") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and an integer of over 4,300 digits
        why = "a number of over 4,300 digits" if "integer string conversion" in str(e) else _clip(str(e), 160)
        raise RequestError(400, "body", f"not JSON this server reads: {why}") from None
    if not isinstance(d, dict):
        raise RequestError(400, "body", f"must be a JSON object, got {type(d).__name__}")
    bad = _lone_surrogate(d)
    if bad:
        raise RequestError(400, bad, "holds a lone surrogate (a \\ud800-\\udfff escape without its pair): "
                                     "not Unicode text")
    return d


def caption_task(task: str) -> bool:
    """A task prompted by text (t2i, t2a, t2t) rather than by input media (i2t, a2t)."""
    return task.startswith("t2")


def parse_request(body: bytes, tasks: list[str], limits: ServeConfig) -> GenRequest:
    """A POST /v1/generate body -> GenRequest, or RequestError naming the first bad field."""
    d = read_body(body, limits)
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise RequestError(422, unknown[0], f"unknown field; fields: {', '.join(FIELDS)}")
    task = d.get("task")
    if task not in TASKS:
        raise RequestError(422, "task", f"{json.dumps(task)} is not a task: one of {', '.join(TASKS)}")
    if task not in tasks:
        raise RequestError(422, "task", f"{task} is not served by this run (its tasks: {', '.join(tasks)})")
    prompt, media = d.get("prompt"), None
    if caption_task(task):
        if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:  # before anything reads it
            raise RequestError(422, "prompt", f"{len(prompt)} characters, over the {limits.max_prompt_chars}-character "
                                              f"limit (serve.max_prompt_chars)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(422, "prompt", f"{task} needs a non-empty caption string")
        if "input" in d:
            raise RequestError(422, "input", f"{task} takes a caption prompt, not input media")
    else:
        raw = d.get("input")
        if not isinstance(raw, str) or not raw:
            raise RequestError(422, "input", f"{task} needs base64 {'PNG' if task == 'i2t' else 'WAV'} bytes")
        try:
            media = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "input", "not valid base64") from None
    n = number(d, "n", int, 1, 1, limits.max_n)
    opts = GenOptions(seed=number(d, "seed", int, 0, 0, 2**31 - 1),
                      temperature=number(d, "temperature", float, 1.0, 1e-3, 10.0),
                      top_k=number(d, "top_k", int, 0, 0, 100_000),
                      top_p=number(d, "top_p", float, 1.0, 1e-3, 1.0))
    if "max_new_tokens" in d:
        if TARGET[task] != "text":
            raise RequestError(422, "max_new_tokens", f"{task} generates a fixed-length {TARGET[task]} span")
        opts.max_text_tokens = number(d, "max_new_tokens", int, 0, 2, limits.max_new_tokens)
    if "guidance_scale" in d:  # classifier-free guidance (lumo_ray.generate.GenOptions.guidance_scale)
        from .generate import GUIDANCE_MAX

        opts.guidance_scale = number(d, "guidance_scale", float, 1.0, 1.0, GUIDANCE_MAX)
        if TARGET[task] == "text" and opts.guidance_scale != 1.0:
            raise RequestError(422, "guidance_scale", f"{task} generates text: guidance applies to t2i / t2a")
    return GenRequest(task, prompt if caption_task(task) else None, media, n, opts)


def respond_batch(run: Run, reqs: list[GenRequest], limits: Optional[ServeConfig] = None,
                  on_ready: Optional[Callable[[int, Optional[RequestError]], None]] = None,
                  on_text: Optional[Callable[[int, int, str], None]] = None) -> list[dict | Exception]:
    """Requests generated together (generate_jobs: one batch per task and options), each answered with
    ids, checks and the result: text, or the PNG / WAV bytes `lumo generate` writes, in base64. A
    request whose input media does not decode gets its own RequestError (422, input); the rest go on.
    Alone, a request's answer is `lumo generate`'s bytes; in a batch its rows keep their own seeds, so
    only the float rounding of the batched matmuls can differ (serve.exact generates one by one). A
    caption over limits.max_prompt_tokens, or a request whose sequence would not fit the run's
    token_lm.seq.max_len, gets its own RequestError (422) too. The answer's prompt_tokens counts its prompt.

    For a server that streams: on_ready(k, error) as soon as request k's prompt is built (error None) or
    refused (the error it is answered with), before anything generates; on_text(k, row, delta) as row `row`
    of a text request with `stream` set grows (the deltas join to a prefix of its final text)."""
    from .generate import generate_jobs, job_prompt, write_samples

    answers: list[dict | Exception] = [RuntimeError("not generated")] * len(reqs)
    with tempfile.TemporaryDirectory(prefix="lumo-serve-") as tmp:
        jobs, where = [], []
        for k, req in enumerate(reqs):
            src = None
            if req.media is not None:
                src = Path(tmp) / f"input-{k}{MEDIA_SUFFIX[req.task]}"
                src.write_bytes(req.media)
            try:
                if req.prompt is not None and limits is not None:
                    _caption_fits(run, req.prompt, limits.max_prompt_tokens)
                p = job_prompt(run, req.task, req.prompt, src)
                _sequence_fits(run, req, p)
                jobs.append((req.task, p, req.n, req.opts))
                where.append(k)
            except Exception as e:
                answers[k] = _input_error(req, src, e)
            if on_ready is not None:
                on_ready(k, answers[k] if isinstance(answers[k], RequestError) else None)
        texts = _TextSoFar(run, [reqs[k] for k in where], on_text and (lambda j, row, d: on_text(where[j], row, d)))
        for k, (_, p, _, _), gens in zip(where, jobs, generate_jobs(run, jobs, on_token=texts.token)):
            req = reqs[k]
            rows = write_samples(run, req.task, p, gens, Path(tmp) / f"out-{k}", req.opts, req.prompt,
                                 log=lambda *a, **kw: None)
            answers[k] = {"task": req.task, "n": req.n, "options": asdict(req.opts), "prompt_tokens": len(p),
                          "results": [_item(req, r) for r in rows]}
    return answers


class _TextSoFar:
    """The growing text of each row of streamed text requests: generate_jobs' on_token -> on_text(job,
    row, delta), by lumo_ray.generate_text.TextDeltas (the end token is no text; a tail that may still
    become a stop string (opts.stop) or a partial character waits), so the deltas join to a prefix of
    the final text."""

    def __init__(self, run: Run, reqs: list[GenRequest], on_text):
        from .generate import task_spec

        self.run, self.on_text, self.reqs = run, on_text, reqs
        self.ends = {j: () if r.task == "t2t" else tuple(task_spec(run, r.task, r.opts).terminators)
                     for j, r in enumerate(reqs) if r.stream and TARGET.get(r.task) == "text"}
        self.rows: dict = {}
        self.token = self._token if on_text is not None and self.ends else None

    def _token(self, j: int, row: int, tok: int) -> None:
        from .generate_text import TextDeltas

        if j not in self.ends or tok in self.ends[j]:  # (i2t / a2t: their span's end / stop token)
            return
        text = self.run.adapters.text
        if (j, row) not in self.rows:
            eos = text.eos_id if self.reqs[j].task == "t2t" else None
            self.rows[(j, row)] = TextDeltas(text.decode, eos, self.reqs[j].opts.stop)
        delta = self.rows[(j, row)].push(tok)
        if delta:
            self.on_text(j, row, delta)


def _caption_fits(run: Run, prompt: str, max_tokens: int) -> None:
    n = len(run.adapters.text.encode(prompt))  # at most serve.max_prompt_chars characters: cheap
    if n > max_tokens:
        raise RequestError(422, "prompt", f"{n} text tokens, over the {max_tokens}-token limit "
                                          f"(serve.max_prompt_tokens)")


def _sequence_fits(run: Run, req: GenRequest, p) -> None:
    """The prompt, the span it asks for and its end token within the run's token_lm.seq.max_len (a
    base-LM run's lm.seq_len): the model never saw a longer sequence."""
    from .generate import context_len, max_new_tokens

    span, (cap, key) = max_new_tokens(run, req.task, req.opts), context_len(run)
    if len(p) + span > cap:
        field = ("max_new_tokens" if TARGET.get(req.task) == "text" and len(p) + 2 <= cap else
                 "prompt" if req.prompt is not None else "input")
        raise RequestError(422, field, f"{len(p)} prompt tokens and up to {span} generated make {len(p) + span}, over "
                                       f"the run's {key} of {cap}")


def _input_error(req: GenRequest, src: Optional[Path], e: Exception) -> Exception:
    from .codecs.base import MediaError

    if isinstance(e, RequestError):
        return e
    if src is None and type(e).__name__ == "SequenceError":  # a caption the sequence builder refuses
        return RequestError(422, "prompt", str(e).replace("sample prompt: ", ""))
    if src is None or not isinstance(e, (MediaError, OSError, RuntimeError, ValueError)):
        return e
    why = str(e).replace(str(src), "the input")  # the temp path means nothing to the client
    return RequestError(422, "input", f"not a decodable {'image' if req.task == 'i2t' else 'audio'} file: {why}")


def _item(req: GenRequest, r: dict) -> dict:
    item = {"index": r["index"], "ids": r["ids"], "ok": r["ok"], "check": r["check"]}
    if r.get("text") is not None:
        item["text"] = r["text"]
        if r.get("finish_reason"):  # t2t: 'stop' (end token or a stop string) or 'length'
            item["finish_reason"] = r["finish_reason"]
    elif r.get("file"):
        key = "png_base64" if TARGET[req.task] == "image" else "wav_base64"
        item[key] = base64.b64encode(Path(r["file"]).read_bytes()).decode()
    return item


def model_info(run: Run, tasks: list[str], limits: ServeConfig) -> dict:
    """GET /v1/model: what the server loaded and accepts (a base-LM run has no token space: hash None)."""
    from .generate import context_len, model_vocab

    return {"run": run.name, "kind": run.kind, "token_space_hash": run.ts.hash if run.ts is not None else None,
            "token_space_match": run.hash_match, "tasks": tasks,
            "vocab": run.ts.padded_size if run.ts is not None else model_vocab(run.model),
            "limits": {**{k: getattr(limits, k) for k in ("max_body_bytes", "max_prompt_chars", "max_prompt_tokens",
                                                          "max_n", "max_new_tokens", "timeout_s")},
                       "max_len": context_len(run)[0]},
            "batching": {"max_batch_size": limits.max_batch_size, "batch_wait_s": limits.batch_wait_s,
                         "exact": limits.exact}}


def served_tasks(run: Run) -> list[str]:
    """The tasks a run answers: a base-LM run t2t; a token-LM run the media tasks its adapters allow,
    and t2t on the text part of its vocabulary."""
    from .eval.gates import available_tasks

    if run.kind == "base-lm":
        return ["t2t"]
    return available_tasks(run) + (["t2t"] if run.adapters.text is not None else [])
