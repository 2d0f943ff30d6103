"""An OpenAI-compatible HTTP server and a web chat over the C engine (librun.so, through chat.py's Engine).

    python serve.py out/model.bin [-z data/tok4096.bin] [--host 127.0.0.1] [--port 8080] [--slots 4] [--api_key KEY]

GET /v1/models, POST /v1/chat/completions, POST /v1/completions (echo and logprobs, as lm-evaluation-harness's
local-completions scores with), GET /health, and the web chat at GET / (serve.html, one self-contained page).

Design. Each of --slots engine states owns a KV cache and remembers the tokens it holds; a request takes the free
slot whose cache shares the longest prefix with its prompt and feeds only the rest, so a conversation that goes on
is not recomputed (the weights are memory-mapped once by the OS, whatever the slot count). Requests beyond the
slots wait in a queue of --queue places; past it they get 503 with Retry-After. Every request runs on its own
thread (ThreadingHTTPServer: the standard library is enough for a local server, and ctypes releases the GIL while
the engine computes); a client that goes away, waiting or mid-answer, is noticed before the next token and its
slot freed. Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}; a fault inside a request
is logged and answered with 500, never a traceback in the response.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import base64
import hmac
import json
import math
import os
import re
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from chat import Engine, SamplingConfig, TextStream, library_path, load_library, model_files, reply_room

PAGE_PATH = Path(__file__).resolve().parent / "serve.html"
RETRY_AFTER_S = 1
MAX_STOPS = 4
MAX_LOGPROBS = 5
OWNER = "innerarianna"


# ----------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection: stop working for it (after `tokens` generated ones)."""

    def __init__(self, tokens: int = 0):
        super().__init__(tokens)
        self.tokens = tokens


# ----------------------------------------------------------------------------- request fields

def type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# name: (what it must be, test, allowed range (low, high) or None). null is accepted for every optional field.
COMMON_FIELDS: dict[str, tuple[str, Callable[[Any], bool], Optional[tuple[float, float]]]] = {
    "model": ("a string", lambda v: isinstance(v, str), None),
    "max_tokens": ("an integer", is_integer, (0, 1 << 31)),
    "temperature": ("a number", is_number, (0, 2)),
    "top_p": ("a number", is_number, (0, 1)),
    "top_k": ("an integer", is_integer, (0, 1 << 31)),
    "min_p": ("a number", is_number, (0, 1)),
    "repeat_penalty": ("a number", is_number, (0.01, 10)),
    "repeat_last_n": ("an integer", is_integer, (-1, 1 << 31)),
    "presence_penalty": ("a number", is_number, (-2, 2)),
    "frequency_penalty": ("a number", is_number, (-2, 2)),
    "seed": ("an integer", is_integer, (-(1 << 63), (1 << 64) - 1)),
    "stop": ("a string or an array of strings",
             lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)), None),
    "stream": ("a boolean", lambda v: isinstance(v, bool), None),
    "stream_options": ("an object", lambda v: isinstance(v, dict), None),
    "n": ("an integer", is_integer, (1, 1)),
    "user": ("a string", lambda v: isinstance(v, str), None),
}
CHAT_FIELDS = {**COMMON_FIELDS,
               "messages": ("an array", lambda v: isinstance(v, list), None),
               "max_completion_tokens": ("an integer", is_integer, (0, 1 << 31)),
               "trim_history": ("a boolean", lambda v: isinstance(v, bool), None)}  # ours: see chat_job
COMPLETION_FIELDS = {**COMMON_FIELDS,
                     "prompt": ("a string, an array of strings, an array of tokens or an array of token arrays",
                                lambda v: isinstance(v, (str, list)), None),
                     "echo": ("a boolean", lambda v: isinstance(v, bool), None),
                     "logprobs": ("an integer", is_integer, (0, MAX_LOGPROBS))}


# OpenAI fields this server has no use for, accepted at these values only (clients often send the defaults).
CHAT_DEFAULT_ONLY: dict[str, tuple] = {
    "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "response_format": ({"type": "text"},),
    "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False), "store": (False,)}
COMPLETION_DEFAULT_ONLY: dict[str, tuple] = {"logit_bias": ({},), "best_of": (1,), "suffix": ("",)}


def check_fields(body: Any, fields: dict, required: tuple[str, ...], default_only: dict[str, tuple]) -> dict:
    """body as a dict of known fields of the right types and ranges (nulls dropped), else ApiError 400."""
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, not {type_name(body)}.", code="invalid_type")
    for name, value in list(body.items()):
        if name in default_only:
            if value is not None and value not in default_only[name]:
                raise ApiError(400, f"'{name}' is not supported by this server (only {default_only[name][0]!r}).",
                               code="unsupported_value", param=name)
            del body[name]
            continue
        if name not in fields:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", code="unknown_parameter",
                           param=name)
        what, test, bounds = fields[name]
        if value is None:
            continue
        if not test(value):
            raise ApiError(400, f"Invalid type for '{name}': expected {what}, but got {type_name(value)} instead.",
                           code="invalid_type", param=name)
        if bounds and not bounds[0] <= value <= bounds[1]:
            raise ApiError(400, f"Invalid value for '{name}': {value} is outside [{bounds[0]}, {bounds[1]}].",
                           code="invalid_value", param=name)
    for name in required:
        if body.get(name) is None:
            raise ApiError(400, f"Missing required parameter: '{name}'.", code="missing_required_parameter",
                           param=name)
    return {name: value for name, value in body.items() if value is not None}


@dataclass
class Sampling(SamplingConfig):
    """How the next token is drawn: chat.py's settings (run.c's one sampler, arianna_sample_with) with OpenAI's
    defaults, and no seed meaning a fresh one. The penalties look at the last repeat_last_n tokens of the context;
    the answer's length is the request's max_tokens, not max_new_tokens."""
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None

    @classmethod
    def from_request(cls, request: dict) -> "Sampling":
        names = [name for name in cls.__dataclass_fields__ if name in request]
        return cls(**{name: request[name] for name in names})

    def rng(self) -> ctypes.c_ulonglong:
        seed = self.seed if self.seed is not None else time.time_ns()
        return ctypes.c_ulonglong(seed & 0xFFFFFFFFFFFFFFFF or 1)


@dataclass
class Job:
    """One prompt to continue, with everything that decides when and how it stops."""
    prompt: list[int]
    sampling: Sampling
    max_tokens: Optional[int]  # None: until a stop or the context is full
    stops: list[str]
    stop_ids: frozenset[int]
    strip_space: bool  # chat answers lose the leading dummy-prefix space, completions keep it
    logprobs: Optional[int] = None  # top alternatives per generated token; None: no logprobs
    prompt_logprobs: bool = False  # echo with logprobs: every prompt token scored too


def stop_list(request: dict) -> list[str]:
    stops = request.get("stop", [])
    stops = [stops] if isinstance(stops, str) else stops
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' holds at most {MAX_STOPS} sequences, got {len(stops)}.", code="invalid_value",
                       param="stop")
    return [stop for stop in stops if stop]


def max_tokens(request: dict, default: Optional[int]) -> Optional[int]:
    return request.get("max_completion_tokens", request.get("max_tokens", default))


# ----------------------------------------------------------------------------- prompts

def message_text(message: Any, index: int) -> tuple[str, str]:
    """(role, text) of one chat message; content may be a string or an array of text parts."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
        raise ApiError(400, f"Invalid {where}: expected an object with 'role' system, user or assistant and "
                            "'content'.", code="invalid_value", param=where)
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise ApiError(400, f"Invalid {where}.content: only text parts are supported.", code="invalid_value",
                           param=f"{where}.content")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(400, f"Invalid type for '{where}.content': expected a string, but got {type_name(content)} "
                            "instead.", code="invalid_type", param=f"{where}.content")
    role = "system" if message["role"] == "developer" else message["role"]
    return role, content


def chat_prompt(engine: Engine, messages: list) -> list[int]:
    """The tokens of a conversation through the one chat template (tokenizer.py's encode_dialog, built by the
    engine's arianna_chat_turn): BOS, system and user segments, each answer followed by EOS."""
    if not messages:
        raise ApiError(400, "'messages' must hold at least one message.", code="invalid_value", param="messages")
    tokens: list[int] = []
    system = ""
    parsed = [message_text(message, index) for index, message in enumerate(messages)]
    if parsed[-1][0] != "user":
        raise ApiError(400, "The last message must have the role 'user'.", code="invalid_value", param="messages")
    for role, text in parsed:
        if role == "system":
            system = f"{system}\n{text}" if system else text
        elif role == "user":
            tokens += engine.chat_turn(system, text, first_turn=not tokens)
            system = ""
        else:
            tokens += ([] if tokens else [engine.bos]) + engine.encode(text) + [engine.eos]
    return tokens


def without_oldest_exchange(messages: list) -> Optional[list]:
    """messages less the first user message and what follows it up to the next one (system messages stay); None when
    the last user message is the only one."""
    users = [index for index, message in enumerate(messages) if isinstance(message, dict)
             and message.get("role") == "user"]
    if len(users) < 2:
        return None
    return [message for index, message in enumerate(messages)
            if not users[0] <= index < users[1] or message.get("role") in ("system", "developer")]


def completion_prompts(engine: Engine, prompt: Any) -> list[tuple[list[int], Optional[str]]]:
    """(tokens, text or None) of each prompt: a text is encoded after BOS as ./run does, token ids are used as given."""
    def valid_ids(ids: list) -> bool:
        return bool(ids) and all(is_integer(t) and 0 <= t < engine.vocab_size for t in ids)

    if isinstance(prompt, str):
        return [([engine.bos] + engine.encode(prompt), prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [([engine.bos] + engine.encode(p), p) for p in prompt]
    if valid_ids(prompt):
        return [(list(prompt), None)]
    if prompt and all(isinstance(p, list) and valid_ids(p) for p in prompt):
        return [(list(p), None) for p in prompt]
    raise ApiError(400, f"Invalid 'prompt': expected a string, an array of strings, or arrays of token ids in "
                        f"[0, {engine.vocab_size}).", code="invalid_value", param="prompt")


# ----------------------------------------------------------------------------- slots

@dataclass
class Slot:
    engine: Engine
    index: int
    cached: list[int] = field(default_factory=list)  # the tokens at KV-cache positions 0..len-1
    last_used: float = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotPool:
    """--slots engines; a request waits for one in a bounded queue, then takes the one whose cache suits it best."""

    def __init__(self, engines: list[Engine], queue_size: int):
        self.slots = [Slot(engine, index) for index, engine in enumerate(engines)]
        self.free = list(self.slots)
        self.queue_size = queue_size
        self.waiting = 0
        self.condition = threading.Condition()

    def status(self) -> dict:
        with self.condition:
            idle = len(self.free)
            return {"slots_idle": idle, "slots_processing": len(self.slots) - idle, "queued": self.waiting}

    @contextmanager
    def acquire(self, prompt: list[int], gone: Callable[[], bool]) -> Iterator[Slot]:
        with self.condition:
            if not self.free and self.waiting >= self.queue_size:
                raise ApiError(503, f"The server is busy: all {len(self.slots)} slots are in use and "
                                    f"{self.waiting} requests are waiting. Retry later.", kind="server_error",
                               code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
            self.waiting += 1
            try:
                while not self.free:
                    if gone():
                        raise ClientGone()
                    self.condition.wait(0.1)
            finally:
                self.waiting -= 1
            slot = max(self.free, key=lambda s: (common_prefix(s.cached, prompt), -s.last_used))
            self.free.remove(slot)
        try:
            yield slot
        finally:
            with self.condition:
                slot.last_used = time.monotonic()
                self.free.append(slot)
                self.condition.notify()


# ----------------------------------------------------------------------------- generation

class TextOutput:
    """The generated text: whole characters, cut at the first stop string. take() hands out what is safe to send:
    all but a tail that could still grow into a stop string."""

    def __init__(self, stops: list[str], strip_space: bool):
        self.stream, self.stops = TextStream(strip_space), stops
        self.text, self.sent = "", 0

    def push(self, data: bytes, final: bool = False) -> bool:
        """Add a token's bytes; True when a stop string has appeared (the text then ends before it)."""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += self.stream.push(data, final)
        hits = [i for i in (self.text.find(stop, start) for stop in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def take(self, final: bool = False) -> str:
        hold = 0 if final else max((k for stop in self.stops for k in range(1, len(stop))
                                    if self.text.endswith(stop[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)
        chunk, self.sent = self.text[self.sent:end], end
        return chunk


@dataclass
class TokenLogprob:
    token: str
    logprob: Optional[float]
    top: dict[str, float]


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens the slot's KV cache held already
    logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens (with echo) then generated ones


def log_softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    log_sum = top + math.log(math.fsum(math.exp(x - top) for x in logits))
    return [x - log_sum for x in logits]


def scored(engine: Engine, prev: int, token: int, n_top: int) -> TokenLogprob:
    """The model's log-probability of token from the logits of the last token fed, with the n_top best."""
    logprobs = log_softmax(engine.logits())
    best = sorted(range(len(logprobs)), key=logprobs.__getitem__, reverse=True)[:n_top]
    return TokenLogprob(piece(engine, prev, token), logprobs[token],
                        {piece(engine, prev, t): logprobs[t] for t in best})


def piece(engine: Engine, prev: int, token: int) -> str:
    return engine.decode(prev, token).decode("utf-8", "replace")


def generate(slot: Slot, job: Job, emit: Callable[[str], None], gone: Callable[[], bool]) -> Result:
    """Continue job.prompt in slot: feed what its cache lacks, sample until a stop, the token cap or a full
    context, sending text through emit as it becomes final."""
    result = Result("", "length", len(job.prompt), 0, 0)
    try:
        feed_prompt(slot, job, result, gone)
        return sample_answer(slot, job, result, emit, gone)
    except ClientGone:
        raise ClientGone(result.completion_tokens) from None


def feed_prompt(slot: Slot, job: Job, result: Result, gone: Callable[[], bool]) -> None:
    engine, prompt = slot.engine, job.prompt
    if not job.prompt_logprobs:
        reuse = min(common_prefix(slot.cached, prompt), len(prompt) - 1)  # the last token is fed for its logits
        del slot.cached[reuse:]
        engine.feed(prompt[reuse:], reuse)
        slot.cached, result.cached_tokens = list(prompt), reuse
        return
    slot.cached = []  # every prompt position's logits are needed: one token at a time from the start
    for pos, token in enumerate(prompt):
        if pos:
            result.logprobs.append(scored(engine, prompt[pos - 1], token, job.logprobs or 0))
        elif token != engine.bos:
            result.logprobs.append(TokenLogprob(piece(engine, engine.bos, token), None, {}))
        engine.feed([token], pos)
        slot.cached.append(token)
        if gone():
            raise ClientGone()


def sample_answer(slot: Slot, job: Job, result: Result, emit: Callable[[str], None],
                  gone: Callable[[], bool]) -> Result:
    engine, scoring = slot.engine, job.logprobs is not None
    output = TextOutput(job.stops, job.strip_space)
    rng, settings, prev, cap = job.sampling.rng(), job.sampling.settings(), job.prompt[-1], job.max_tokens
    while cap is None or result.completion_tokens < cap:
        if gone():
            raise ClientGone()
        token = engine.sample_with(settings, slot.cached, rng)
        if token in job.stop_ids:
            result.finish_reason = "stop"
            break
        if scoring:
            result.logprobs.append(scored(engine, prev, token, job.logprobs or 0))
        result.completion_tokens += 1
        if output.push(engine.decode(prev, token)):
            result.finish_reason = "stop"
            break
        emit(output.take())
        if len(slot.cached) >= engine.seq_len:  # no position left to feed it at
            break
        engine.feed([token], len(slot.cached))
        slot.cached.append(token)
        prev = token
    if result.finish_reason == "length":
        output.push(b"", final=True)
    emit(output.take(final=True))
    result.text = output.text
    return result


# ----------------------------------------------------------------------------- the API

@dataclass
class ServerConfig:
    model: str
    tokenizer: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8080
    slots: int = 4
    queue: int = 0  # 0: twice the slots
    api_key: Optional[str] = None
    threads: int = 0  # per slot; 0: the CPUs shared out among the slots
    max_body: int = 1 << 20


class Api:
    """The endpoints, independent of HTTP plumbing: each takes the parsed request and returns a JSON object, or
    streams events through a writer."""

    def __init__(self, config: ServerConfig, engines: list[Engine]):
        self.config = config
        self.pool = SlotPool(engines, config.queue or 2 * config.slots)
        self.model_id = Path(config.model).stem
        self.created = int(Path(config.model).stat().st_mtime)
        self.engine = engines[0]  # for encoding, which only reads the tokenizer (decoding uses the slot's own)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": OWNER, "context_length": self.engine.seq_len}]}

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, **self.pool.status()}

    def check_context(self, prompt: list[int], cap: Optional[int], param: str) -> None:
        needed = len(prompt) + (0 if cap == 0 else 1)
        if needed > self.engine.seq_len:
            raise ApiError(400, f"This model's maximum context length is {self.engine.seq_len} tokens, but the "
                                f"prompt is {len(prompt)} tokens" + ("" if cap == 0 else " with no room to answer") +
                                ". Shorten the prompt.", code="context_length_exceeded", param=param)

    def chat_job(self, request: dict) -> tuple[Job, int]:
        """The request's job, and how many of its oldest exchanges were dropped. OpenAI's API answers what it is
        sent; with "trim_history" (the web chat's, not OpenAI's) the oldest exchanges are dropped until a whole
        reply fits after the rest, as chat.py keeps its conversation (reply_room)."""
        messages, cap, dropped = request["messages"], max_tokens(request, None), 0
        prompt = chat_prompt(self.engine, messages)
        room = reply_room(self.engine.seq_len, cap)
        while request.get("trim_history") and len(prompt) + room > self.engine.seq_len:
            shorter = without_oldest_exchange(messages)
            if shorter is None:
                break
            messages, dropped = shorter, dropped + 1
            prompt = chat_prompt(self.engine, messages)
        self.check_context(prompt, cap, "messages")
        return Job(prompt, Sampling.from_request(request), cap, stop_list(request), frozenset([self.engine.eos]),
                   strip_space=True), dropped

    def completion_jobs(self, request: dict) -> list[tuple[Job, Optional[str]]]:
        prompts = completion_prompts(self.engine, request["prompt"])
        cap = max_tokens(request, 16)
        echo, logprobs = request.get("echo", False), request.get("logprobs")
        if request.get("stream") and (len(prompts) > 1 or logprobs is not None):
            raise ApiError(400, "Streaming takes one prompt and no 'logprobs'.", code="invalid_value",
                           param="stream")
        stop_ids = frozenset([self.engine.eos, self.engine.bos])
        jobs = []
        for tokens, text in prompts:
            self.check_context(tokens, cap, "prompt")
            jobs.append((Job(tokens, Sampling.from_request(request), cap, stop_list(request), stop_ids,
                             strip_space=False, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None),
                         text))
        return jobs



def echo_text(engine: Engine, tokens: list[int], text: Optional[str]) -> str:
    """The prompt as echoed: its text as sent, or its tokens decoded (by the engine of the slot in use: decoding
    writes the engine's piece buffer)."""
    if text is not None:
        return text
    return "".join(piece(engine, prev, token) for prev, token in zip([engine.bos] + tokens[:-1], tokens)
                   if token != engine.bos)


def usage(results: list[Result]) -> dict:
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)}}


def logprobs_object(entries: list[TokenLogprob], start_offset: int) -> dict:
    offsets, offset = [], start_offset
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top or None for e in entries], "text_offset": offsets}


# ----------------------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "InnerArianna"
    timeout = 60  # an idle or stalled connection is dropped after a minute
    server: "Server"

    # -- plumbing
    def log_request(self, code: Any = "-", size: Any = "-") -> None:  # log_line writes the one line per request
        pass

    def log_message(self, format: str, *args: Any) -> None:  # the standard library's own complaints
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def log_line(self) -> None:
        elapsed = (time.monotonic() - self.started) * 1000
        sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.command} {self.path} {self.status} "
                         f"{self.tokens} tokens {elapsed:.0f} ms\n")
        sys.stderr.flush()

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """The standard library's own errors (a malformed request line, ...) in OpenAI's shape too."""
        self.close_connection = True
        self.send_json(code, ApiError(code, message or "Bad request.").body())

    def send_json(self, status: int, body: dict, headers: Optional[dict[str, str]] = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def client_gone(self) -> bool:
        """Whether the client closed the connection (its request is read in full, so a readable socket that
        yields nothing means it is gone)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def start_stream(self) -> None:
        self.status, self.streaming = 200, True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def send_event(self, data: Any) -> None:
        payload = ("data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n")
        raw = payload.encode("utf-8")
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()
        except OSError:
            raise ClientGone() from None

    def end_stream(self) -> None:
        self.send_event("[DONE]")
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            raise ClientGone() from None

    def read_body(self) -> Any:
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length_header is None:
            self.close_connection = True
            raise ApiError(411, "Send the body with a Content-Length header.", code="length_required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"Invalid Content-Length: {length_header!r}.", code="invalid_value") from None
        if length > self.server.config.max_body:
            self.close_connection = True  # the body stays unread
            raise ApiError(413, f"The request body is {length} bytes; the limit is {self.server.config.max_body}.",
                           code="request_too_large")
        try:
            raw = self.rfile.read(length)
        except OSError:  # the timeout: fewer bytes came than Content-Length said
            self.close_connection = True
            raise ApiError(408, f"The request body did not arrive within {self.timeout} s.",
                           code="request_timeout") from None
        self.body_read = True
        if len(raw) < length:
            raise ClientGone()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"We could not parse the JSON body of your request ({e}).", code="invalid_json") \
                from None

    def authorized(self) -> bool:
        key = self.server.config.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode("utf-8"))

    # -- routing
    def do_GET(self) -> None:
        self.dispatch()

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def dispatch(self) -> None:
        self.started, self.status, self.tokens, self.streaming, self.body_read = time.monotonic(), 0, 0, False, False
        path = self.path.split("?", 1)[0]
        routes: dict[str, dict[str, Callable[[], None]]] = {
            "/": {"GET": self.page}, "/index.html": {"GET": self.page},
            "/health": {"GET": self.health}, "/v1/models": {"GET": self.models},
            "/v1/chat/completions": {"POST": self.chat_completions}, "/v1/completions": {"POST": self.completions},
        }
        try:
            methods = routes.get(path)
            if methods is None:
                raise ApiError(404, f"Unknown path {path}.", code="not_found")
            method = "GET" if self.command == "HEAD" else self.command
            if method not in methods:
                raise ApiError(405, f"{self.command} is not allowed on {path}; use {', '.join(methods)}.",
                               code="method_not_allowed", headers={"Allow": ", ".join(methods)})
            if path not in ("/health", "/", "/index.html") and not self.authorized():
                raise ApiError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            methods[method]()
        except ClientGone as e:
            self.status, self.tokens, self.close_connection = 499, e.tokens, True  # nginx's "client closed request", for the log only
        except ApiError as e:
            self.answer_error(e)
        except Exception:  # a fault of ours: logged here, never sent
            traceback.print_exc(file=sys.stderr)
            self.answer_error(ApiError(500, "The server had an error while processing your request.",
                                       kind="server_error", code="internal_error"))
        self.log_line()

    def answer_error(self, error: ApiError) -> None:
        if self.command == "POST" and not self.body_read:
            self.close_connection = True  # what is left of the body must not be read as the next request
        try:
            if self.streaming:  # the headers went out already: the error is the stream's last event
                self.status = error.status
                self.send_event(error.body())
                self.end_stream()
            else:
                self.send_json(error.status, error.body(), error.headers)
        except (OSError, ClientGone):
            self.close_connection = True

    # -- endpoints
    def page(self) -> None:
        page, policy = self.server.page
        self.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Content-Security-Policy", policy)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(page)

    def health(self) -> None:
        self.send_json(200, self.server.api.health())

    def models(self) -> None:
        self.send_json(200, self.server.api.models())

    def chat_completions(self) -> None:
        api = self.server.api
        request = check_fields(self.read_body(), CHAT_FIELDS, ("messages",), CHAT_DEFAULT_ONLY)
        job, dropped = api.chat_job(request)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": api.model_id, "system_fingerprint": OWNER,
                **({"dropped_turns": dropped} if request.get("trim_history") else {})}
        with api.pool.acquire(job.prompt, self.client_gone) as slot:
            if not request.get("stream"):
                result = generate(slot, job, lambda text: None, self.client_gone)
                self.tokens = result.completion_tokens
                self.send_json(200, {**head, "object": "chat.completion", "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                    "finish_reason": result.finish_reason}],
                    "usage": usage([result])})
                return
            include_usage = bool(request.get("stream_options", {}).get("include_usage"))
            chunk = {**head, "object": "chat.completion.chunk"}
            extra = {"usage": None} if include_usage else {}

            def event(delta: dict, finish: Optional[str] = None) -> None:
                self.send_event({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                        "finish_reason": finish}], **extra})

            self.start_stream()
            event({"role": "assistant", "content": ""})
            result = generate(slot, job, lambda text: text and event({"content": text}), self.client_gone)
        self.tokens = result.completion_tokens
        event({}, result.finish_reason)
        if include_usage:
            self.send_event({**chunk, "choices": [], "usage": usage([result])})
        self.end_stream()

    def completions(self) -> None:
        api = self.server.api
        request = check_fields(self.read_body(), COMPLETION_FIELDS, ("prompt",), COMPLETION_DEFAULT_ONLY)
        jobs = api.completion_jobs(request)
        echo = request.get("echo", False)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": api.model_id,
                "system_fingerprint": OWNER}
        if request.get("stream"):
            (job, text), = jobs
            include_usage = bool(request.get("stream_options", {}).get("include_usage"))
            extra = {"usage": None} if include_usage else {}

            def event(piece_text: str, finish: Optional[str] = None) -> None:
                self.send_event({**head, "choices": [{"index": 0, "text": piece_text, "logprobs": None,
                                                      "finish_reason": finish}], **extra})

            with api.pool.acquire(job.prompt, self.client_gone) as slot:
                self.start_stream()
                if echo:
                    event(echo_text(slot.engine, job.prompt, text))
                result = generate(slot, job, lambda t: t and event(t), self.client_gone)
            self.tokens = result.completion_tokens
            event("", result.finish_reason)
            if include_usage:
                self.send_event({**head, "choices": [], "usage": usage([result])})
            self.end_stream()
            return
        choices, results = [], []
        with api.pool.acquire(jobs[0][0].prompt, self.client_gone) as slot:
            for index, (job, text) in enumerate(jobs):
                result = generate(slot, job, lambda t: None, self.client_gone)
                prefix = echo_text(slot.engine, job.prompt, text) if echo else ""
                logprobs = None
                if job.logprobs is not None:
                    entries = result.logprobs if echo else result.logprobs[len(result.logprobs)
                                                                          - result.completion_tokens:]
                    logprobs = logprobs_object(entries, 0 if echo else len(prefix))
                choices.append({"index": index, "text": prefix + result.text, "logprobs": logprobs,
                                "finish_reason": result.finish_reason})
                results.append(result)
        self.tokens = sum(r.completion_tokens for r in results)
        self.send_json(200, {**head, "choices": choices, "usage": usage(results)})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, config: ServerConfig, api: Api, page: bytes):
        super().__init__((config.host, config.port), Handler)
        self.config, self.api = config, api
        self.page = (page, page_policy(page))


def page_policy(page: bytes) -> str:
    """A Content-Security-Policy that lets only the page's own inline script and style run and connect back to
    this server: even text that somehow reached the page as HTML could not run a script."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks)

    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Optional[list[str]] = None) -> ServerConfig:
    parser = argparse.ArgumentParser(description="OpenAI-compatible server and web chat over the C engine.")
    parser.add_argument("model", help="model .bin written by export.py")
    parser.add_argument("-z", "--tokenizer", help="tokenizer .bin (default: the tok*.bin beside the model or in "
                                                  "data/ whose size matches the model's vocabulary)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    parser.add_argument("--slots", type=int, default=4, help="conversations computed at once, each with its own "
                                                             "KV cache (default 4)")
    parser.add_argument("--queue", type=int, default=0, help="requests that may wait for a slot before the "
                                                             "server answers 503 (default twice --slots)")
    parser.add_argument("--api_key", "--api-key", dest="api_key",
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health and the page "
                             "(default: the ARIANNA_API_KEY environment variable, else none)",
                        default=os.environ.get("ARIANNA_API_KEY"))
    parser.add_argument("--threads", type=int, default=0, help="engine threads per slot (default: the CPUs "
                                                               "shared out among the slots)")
    parser.add_argument("--max_body", "--max-body", dest="max_body", type=int, default=1 << 20,
                        help="largest request body in bytes (default 1 MiB)")
    args = parser.parse_args(argv)
    if args.slots < 1 or args.queue < 0 or args.threads < 0 or args.max_body < 1 or not 0 <= args.port < 65536:
        parser.error("--slots and --max_body must be at least 1, --queue and --threads not negative, "
                     "--port in [0, 65535]")
    return ServerConfig(**vars(args))


def main(argv: Optional[list[str]] = None) -> None:
    config = parse_args(argv)
    model_path, tokenizer_path = model_files(config.model, config.tokenizer)
    try:
        page = PAGE_PATH.read_bytes()
    except OSError as e:
        raise SystemExit(f"error: cannot read the web chat page {PAGE_PATH}: {e.strerror}") from None
    threads = config.threads or max(1, len(os.sched_getaffinity(0)) // config.slots)
    lib = load_library(library_path())
    engines: list[Engine] = []
    try:
        for _ in range(config.slots):
            engines.append(Engine(lib, model_path, tokenizer_path, threads))
        api = Api(config, engines)
        try:
            server = Server(config, api, page)
        except OSError as e:
            raise SystemExit(f"error: cannot listen on {config.host}:{config.port} ({e.strerror}); "
                             "pick another --port") from None
        host, port = server.server_address[:2]
        print(f"serving {model_path.name} ({engines[0].seq_len} tokens of context, {config.slots} slots of "
              f"{threads} thread{'s' if threads != 1 else ''}, {engines[0].isa} kernels) on http://{host}:{port}/"
              + (" (API key required)" if config.api_key else ""), file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        for engine in engines:
            engine.close()


if __name__ == "__main__":
    main()
