"""Chat with an exported model in the terminal, streaming each answer through the C engine (librun.so).

    python chat.py out/model.bin -z data/tok4096.bin [-t 0 -p 0.9 -n 512 -s SEED -y SYSTEM --threads N]
                   [-k TOP_K --min_p P --repeat_penalty R --repeat_last_n N --presence_penalty A --frequency_penalty B]

The conversation lives in the engine's KV cache: each turn feeds only its new tokens (the chat template
of tokenizer.py, built by arianna_chat_turn), then the answer is sampled and fed token by token.
When the history no longer fits the context, the oldest turns are dropped and the rest is fed again.

At the prompt: quit, exit, /bye or Ctrl-D leave; Ctrl-C during an answer stops it; a line ending in a
backslash continues on the next line; /help lists the slash commands. With stdin not a terminal
(a pipe or a file), every line is one message and only the answers are written to stdout.
"""
from __future__ import annotations

import argparse
import codecs
import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from formats import FormatError, atomic_write, read_model_header, read_regular_file

REPO_DIR = Path(__file__).resolve().parent
LIBRARY_NAME = "librun.so"
HISTORY_FILE = ".arianna_history"
PROMPT, CONTINUATION_PROMPT = ">>> ", "... "
ERR_SIZE = 512

HELP = """Commands:
  /help, /?          this help
  /clear, /reset     forget the conversation (the system prompt stays)
  /system [TEXT]     set the system prompt and start over; without TEXT, show it
  /save FILE         write the conversation as JSON {"system": ..., "messages": [...]}
  /load FILE         read a conversation saved by /save and continue it
  /bye, quit, exit   leave (Ctrl-D too)
Ctrl-C stops an answer; a line ending in \\ continues on the next line."""


class ChatError(Exception):
    """A problem to report in one line (bad file, message too long, ...); the chat goes on."""


# ----------------------------------------------------------------------------- the C engine

def library_path() -> Path:
    """librun.so beside this file, (re)built with `make librun.so` when missing or older than its sources."""
    library, source = REPO_DIR / LIBRARY_NAME, REPO_DIR / "run.c"
    sources = [source, *REPO_DIR.glob("run_*.[ch]")]  # run.c, the headers it includes, the dispatching build's kernels
    stale = source.exists() and (not library.exists()
                                 or library.stat().st_mtime < max(path.stat().st_mtime for path in sources))
    if stale:
        try:
            build = subprocess.run(["make", "-s", LIBRARY_NAME], cwd=REPO_DIR, capture_output=True, text=True)
        except OSError as e:
            raise SystemExit(f"error: cannot run `make {LIBRARY_NAME}` in {REPO_DIR} ({e.strerror}); "
                             "install make and a C compiler") from None
        if build.returncode != 0:
            detail = (build.stderr.strip().splitlines() or ["make failed"])[-1]
            raise SystemExit(f"error: building {library} with `make {LIBRARY_NAME}` failed: {detail}")
    if not library.exists():
        raise SystemExit(f"error: {library} not found and no run.c beside it to build it from")
    return library


class SamplerSettings(ctypes.Structure):
    """run.c's AriannaSampling: how arianna_sample_with draws a token (llama.cpp's meanings; see run.c)."""
    _fields_ = [("temperature", ctypes.c_float), ("top_p", ctypes.c_float), ("top_k", ctypes.c_int),
                ("min_p", ctypes.c_float), ("repeat_penalty", ctypes.c_float), ("repeat_last_n", ctypes.c_int),
                ("presence_penalty", ctypes.c_float), ("frequency_penalty", ctypes.c_float)]


def load_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    engine, int_p, ulonglong_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_ulonglong)
    signatures = {
        "arianna_open": (engine, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]),
        "arianna_close": (None, [engine]),
        "arianna_seq_len": (ctypes.c_int, [engine]),
        "arianna_vocab_size": (ctypes.c_int, [engine]),
        "arianna_bos": (ctypes.c_int, [engine]),
        "arianna_eos": (ctypes.c_int, [engine]),
        "arianna_encode": (ctypes.c_int, [engine, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, int_p, ctypes.c_int]),
        "arianna_chat_turn": (ctypes.c_int,
                              [engine, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, int_p, ctypes.c_int]),
        "arianna_feed": (ctypes.c_int, [engine, int_p, ctypes.c_int, ctypes.c_int]),
        "arianna_logits": (ctypes.POINTER(ctypes.c_float), [engine]),
        "arianna_sample": (ctypes.c_int, [engine, ctypes.c_float, ctypes.c_float, ulonglong_p]),
        "arianna_sample_with": (ctypes.c_int, [engine, ctypes.POINTER(SamplerSettings), int_p, ctypes.c_int,
                                               ulonglong_p]),
        "arianna_distribution": (ctypes.c_int, [engine, ctypes.POINTER(SamplerSettings), int_p, ctypes.c_int,
                                                ctypes.POINTER(ctypes.c_float)]),
        "arianna_decode": (ctypes.c_char_p, [engine, ctypes.c_int, ctypes.c_int]),
        "arianna_isa": (ctypes.c_char_p, [engine]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


class Engine:
    """One model + tokenizer opened in librun.so, with its KV cache."""

    def __init__(self, lib: ctypes.CDLL, model_path: Path, tokenizer_path: Path, n_threads: int = 0):
        err = ctypes.create_string_buffer(ERR_SIZE)
        handle = lib.arianna_open(os.fsencode(model_path), os.fsencode(tokenizer_path), n_threads, err, ERR_SIZE)
        if not handle:
            message = err.value.decode("utf-8", "replace").strip() or f"cannot open {model_path}"
            raise SystemExit(message if message.startswith("error") else f"error: {message}")
        self.lib, self.handle = lib, ctypes.c_void_p(handle)
        self.seq_len: int = lib.arianna_seq_len(self.handle)
        self.vocab_size: int = lib.arianna_vocab_size(self.handle)
        self.bos: int = lib.arianna_bos(self.handle)
        self.eos: int = lib.arianna_eos(self.handle)
        self.isa: str = lib.arianna_isa(self.handle).decode()  # the kernels it runs: avx512, avx2, scalar

    def close(self) -> None:
        if self.handle:
            self.lib.arianna_close(self.handle)
            self.handle = None

    @staticmethod
    def _grow(call: Callable[[ctypes.Array, int], int], guess: int) -> list[int]:
        """Run a C call writing ids into a buffer, once more with the size it asked for if the guess was short."""
        out = (ctypes.c_int * guess)()
        count = call(out, guess)
        if count < 0:
            out = (ctypes.c_int * -count)()
            count = call(out, -count)
        return list(out[:count])

    def encode(self, text: str) -> list[int]:
        """SentencePiece tokens of text, with its dummy-prefix space, without BOS/EOS."""
        data = text.encode("utf-8")
        return self._grow(lambda out, size: self.lib.arianna_encode(self.handle, data, 0, 0, out, size), len(data) + 8)

    def chat_turn(self, system: str, user: str, first_turn: bool) -> list[int]:
        """The template tokens of one user turn: [BOS + system segment if first_turn] + user segment."""
        system_bytes = system.encode("utf-8") if first_turn and system else None
        user_bytes = user.encode("utf-8")
        guess = len(user_bytes) + len(system_bytes or b"") + 32
        return self._grow(lambda out, size: self.lib.arianna_chat_turn(
            self.handle, system_bytes, user_bytes, int(first_turn), out, size), guess)

    def feed(self, tokens: list[int], pos: int) -> None:
        if not tokens:
            return
        array = (ctypes.c_int * len(tokens))(*tokens)
        if self.lib.arianna_feed(self.handle, array, len(tokens), pos) != 0:
            raise ChatError(f"{len(tokens)} tokens at position {pos} overflow the context of {self.seq_len}")

    def logits(self) -> list[float]:
        """The logits after the last token fed, [vocab_size]."""
        return self.lib.arianna_logits(self.handle)[:self.vocab_size]

    def sample(self, temperature: float, top_p: float, rng_state: ctypes.c_ulonglong) -> int:
        return self.lib.arianna_sample(self.handle, temperature, top_p, ctypes.byref(rng_state))

    @staticmethod
    def _window(settings: SamplerSettings, history: Sequence[int]) -> tuple[Optional[ctypes.Array], int]:
        """The tokens of history the penalties look at, as a C array (all when repeat_last_n is -1)."""
        last = len(history) if settings.repeat_last_n < 0 else min(settings.repeat_last_n, len(history))
        window = history[len(history) - last:]
        return ((ctypes.c_int * last)(*window) if last else None), last

    def sample_with(self, settings: SamplerSettings, history: Sequence[int], rng_state: ctypes.c_ulonglong) -> int:
        """The next token drawn with settings from the logits of the last token fed; the penalties look at the end
        of history (the context's tokens, or whichever the caller wants penalised)."""
        window, count = self._window(settings, history)
        return self.lib.arianna_sample_with(self.handle, ctypes.byref(settings), window, count, ctypes.byref(rng_state))

    def distribution(self, settings: SamplerSettings, history: Sequence[int]) -> list[float]:
        """The probabilities sample_with would draw the next token with, one per vocabulary entry."""
        window, count = self._window(settings, history)
        out = (ctypes.c_float * self.vocab_size)()
        self.lib.arianna_distribution(self.handle, ctypes.byref(settings), window, count, out)
        return list(out)

    def decode(self, prev_token: int, token: int) -> bytes:
        return self.lib.arianna_decode(self.handle, prev_token, token) or b""


# ----------------------------------------------------------------------------- finding the tokenizer

def tokenizer_token_count(path: Path) -> Optional[int]:
    """How many tokens a tokenizer .bin holds (int32 max length, then per token float32 score, int32 length,
    bytes), or None when it is not such a file."""
    try:
        data = read_regular_file(path)
    except OSError:
        return None
    offset, count = 4, 0
    while offset + 8 <= len(data):
        length = struct.unpack_from("<i", data, offset + 4)[0]
        if length < 0 or offset + 8 + length > len(data):
            return None
        offset += 8 + length
        count += 1
    return count if offset == len(data) and len(data) >= 4 else None


def find_tokenizer(model_path: Path) -> Path:
    """The tokenizer .bin beside the model or in data/ whose token count equals the model's vocab size."""
    try:
        vocab_size = read_model_header(model_path).vocab_size
    except FormatError as e:
        raise SystemExit(f"error: {e}") from None
    folders = [model_path.parent, Path("data"), REPO_DIR / "data"]
    seen: set[Path] = set()
    for folder in folders:
        for candidate in sorted(folder.glob("tok*.bin")):
            resolved = candidate.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            if tokenizer_token_count(candidate) == vocab_size:
                return candidate
    hint = f"data/tok{vocab_size}.bin (`python tokenizer.py --tokenizer-model=data/tok{vocab_size}.model`)"
    raise SystemExit(f"error: no tokenizer with {vocab_size} tokens (the model's vocab size) beside {model_path} "
                     f"or in data/; pass -z PATH, e.g. {hint}")


# ----------------------------------------------------------------------------- output text

class TextStream:
    """Turns token bytes into printable text: whole UTF-8 characters only (a character split over byte-fallback
    tokens waits for its last byte), control characters other than newline and tab dropped so a model cannot
    drive the terminal, and (with strip_space) the answer's leading dummy-prefix space removed."""

    def __init__(self, strip_space: bool = True) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.started = not strip_space

    def push(self, data: bytes, final: bool = False) -> str:
        text = "".join(ch for ch in self.decoder.decode(data, final)
                       if ch in "\n\t" or unicodedata.category(ch) != "Cc")
        if not self.started and text:
            self.started = True
            text = text[1:] if text.startswith(" ") else text
        return text

    def finish(self) -> str:
        return self.push(b"", final=True)


# ----------------------------------------------------------------------------- the conversation

@dataclass
class Exchange:
    user: str
    assistant: str
    assistant_tokens: list[int]  # what the cache holds for the answer, EOS included


@dataclass
class Reply:
    text: str
    interrupted: bool = False
    context_full: bool = False


@dataclass
class Interrupt:
    requested: bool = False


@contextmanager
def stop_on_sigint() -> Iterator[Interrupt]:
    """While inside, Ctrl-C sets .requested instead of raising KeyboardInterrupt, so an answer can end cleanly."""
    interrupt = Interrupt()

    def handler(signum: int, frame: object) -> None:
        interrupt.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupt
    finally:
        signal.signal(signal.SIGINT, previous)


def reply_room(seq_len: int, cap: Optional[int]) -> int:
    """Positions kept free for an answer (and its EOS) when deciding whether to trim a conversation's history: the
    reply cap, at most 3/4 of the context. train_arianna.sh trains answers of up to 3/4 of a 256-token context, and
    with an earlier exchange in view and less room than that its chat model answers the next question with the
    wrong section (eval/RESULTS.md: Several questions in one conversation). run.c's chat keeps the same room."""
    return max(1, min(cap or seq_len, seq_len * 3 // 4)) + 1


def dropped_note(count: int) -> str:
    return f"(context full: dropped the oldest {count} turn{'s' if count != 1 else ''})"


@dataclass
class SamplingConfig:
    """How answers are sampled; the fields after seed are off unless set (see run.c's AriannaSampling)."""
    temperature: float = 0.8
    top_p: float = 0.9
    max_new_tokens: int = 512  # 0: until EOS or the context is full
    seed: int = 0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # -1: the whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def settings(self) -> SamplerSettings:
        return SamplerSettings(*(getattr(self, name) for name, _ in SamplerSettings._fields_))


@dataclass
class Conversation:
    """The dialog and the engine's KV cache: `context` is what positions 0.. hold (or will, once fed up to it)."""

    engine: Engine
    sampling: SamplingConfig
    system: str = ""
    exchanges: list[Exchange] = field(default_factory=list)
    first_in_context: int = 0  # exchanges before this one were trimmed away for room
    context: list[int] = field(default_factory=list)
    fed: int = 0
    rng_state: ctypes.c_ulonglong = field(init=False)  # the engine's xorshift state, advanced by every sample

    def __post_init__(self) -> None:
        seed = self.sampling.seed or time.time_ns()
        self.rng_state = ctypes.c_ulonglong(seed & 0xFFFFFFFFFFFFFFFF or 1)

    @property
    def answer_room(self) -> int:
        return reply_room(self.engine.seq_len, self.sampling.max_new_tokens)

    def reset(self, system: Optional[str] = None) -> None:
        if system is not None:
            self.system = system
        self.exchanges, self.first_in_context, self.context, self.fed = [], 0, [], 0

    def messages(self) -> list[dict]:
        messages = []
        for exchange in self.exchanges:
            messages += [{"role": "user", "content": exchange.user},
                         {"role": "assistant", "content": exchange.assistant}]
        return messages

    def _history_tokens(self, start: int) -> list[int]:
        tokens: list[int] = []
        for exchange in self.exchanges[start:]:
            tokens += self.engine.chat_turn(self.system, exchange.user, first_turn=not tokens)
            tokens += exchange.assistant_tokens
        return tokens

    def _refit(self, new_user: Optional[str]) -> tuple[int, list[int]]:
        """Drop the oldest exchanges until the rest (plus the new user turn and answer room) fits the context;
        returns (how many were dropped, the new turn's tokens). Rebuilds `context` when something was dropped."""
        seq_len = self.engine.seq_len
        turn = self.engine.chat_turn(self.system, new_user, not self.context) if new_user is not None else []
        if len(self.context) + len(turn) + self.answer_room <= seq_len:
            return 0, turn
        start = self.first_in_context
        while True:
            start += 1
            history = self._history_tokens(start)
            turn = self.engine.chat_turn(self.system, new_user, not history) if new_user is not None else []
            if len(history) + len(turn) + self.answer_room <= seq_len or start >= len(self.exchanges):
                break
        dropped = start - self.first_in_context
        self.first_in_context, self.context, self.fed = start, history, 0
        return dropped, turn

    def _sync(self) -> None:
        """Feed whatever of `context` the cache does not hold yet."""
        self.engine.feed(self.context[self.fed:], self.fed)
        self.fed = len(self.context)

    def load(self, system: str, exchanges: list[Exchange]) -> int:
        """Replace the conversation and feed its history; returns how many of its oldest exchanges did not fit."""
        self.reset(system)
        self.exchanges = exchanges
        self.context = self._history_tokens(0)
        dropped = 0
        if len(self.context) + self.answer_room > self.engine.seq_len:
            dropped, _ = self._refit(None)
        self._sync()
        return dropped

    def reply(self, user: str, emit: Callable[[str], None], note: Callable[[str], None],
              interrupt: Interrupt) -> Reply:
        """Answer user, streaming the text through emit until EOS, the token cap, a full context or
        interrupt.requested; the exchange joins the conversation even when cut short."""
        seq_len = self.engine.seq_len
        alone = len(self.engine.chat_turn(self.system, user, first_turn=True))
        if alone + 2 > seq_len:
            raise ChatError(f"message too long: {alone} tokens with the template, the context holds {seq_len}")
        dropped, turn = self._refit(user)
        if dropped:
            note(dropped_note(dropped))
        self.context += turn
        stream, reply, answer_tokens = TextStream(), Reply(""), []
        cap, settings = self.sampling.max_new_tokens, self.sampling.settings()
        self._sync()
        prev = self.context[-1]
        while not interrupt.requested and not (cap and len(answer_tokens) >= cap):
            if len(self.context) + 2 > seq_len:  # room for this token and the closing EOS
                reply.context_full = True
                break
            token = self.engine.sample_with(settings, self.context, self.rng_state)
            if token == self.engine.eos:
                break
            text = stream.push(self.engine.decode(prev, token))
            reply.text += text
            emit(text)
            answer_tokens.append(token)
            self.context.append(token)
            self._sync()
            prev = token
        reply.interrupted = interrupt.requested
        tail = stream.finish()
        reply.text += tail
        emit(tail)
        # The EOS closes the turn as in training; it is fed with the next turn's tokens.
        self.context.append(self.engine.eos)
        self.exchanges.append(Exchange(user, reply.text, answer_tokens + [self.engine.eos]))
        return reply


# ----------------------------------------------------------------------------- saving and loading

def save_conversation(conversation: Conversation, path: Path) -> None:
    data = {"system": conversation.system, "messages": conversation.messages()}
    try:
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    except OSError as e:
        raise ChatError(f"cannot write {path}: {e.strerror}") from None


def read_conversation(path: Path, encode: Callable[[str], list[int]], eos: int) -> tuple[str, list[Exchange]]:
    """A conversation from JSON {"system": ..., "messages": [...]} (a leading system message works too).
    Any problem with the file is a ChatError, raised before anything of the current conversation changes."""
    try:
        data = json.loads(read_regular_file(path).decode("utf-8"))
    except OSError as e:
        raise ChatError(f"cannot read {path}: {e.strerror or e}") from None
    except RecursionError:
        raise ChatError(f"{path} nests too deeply to be a saved conversation; /save writes the format /load reads") \
            from None
    except ValueError as e:  # not UTF-8, not JSON, or an integer too long to convert
        raise ChatError(f"{path} is not JSON ({e}); /save writes the format /load reads") from None
    shape = f'{path}: expected {{"system": TEXT, "messages": [{{"role": "user"|"assistant", "content": TEXT}}, ...]}}'
    if not isinstance(data, dict) or not isinstance(data.get("messages", []), list):
        raise ChatError(shape)
    system, messages = data.get("system") or "", list(data.get("messages", []))
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) \
            or not isinstance(system, str):
        raise ChatError(shape)
    if messages and messages[0].get("role") == "system":
        system = messages.pop(0)["content"]
    for index, text in enumerate([system] + [m["content"] for m in messages]):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            where = "the system prompt" if index == 0 else f"message {index}"
            raise ChatError(f"{path}: {where} holds a lone surrogate ({text[e.start]!r}), which is not text") \
                from None
    roles = [m.get("role") for m in messages]
    if len(messages) % 2 or roles != ["user", "assistant"] * (len(messages) // 2):
        raise ChatError(f"{path}: messages must alternate user, assistant and end with an assistant answer")
    exchanges = [Exchange(user["content"], answer["content"], encode(answer["content"]) + [eos])
                 for user, answer in zip(messages[::2], messages[1::2])]
    return system, exchanges


# ----------------------------------------------------------------------------- the terminal

# chat.py's defaults, chosen by answer quality (the README's "Sampling"): greedy, which recalls the corpus best;
# with -t above 0, llama.cpp's top-k 40, top-p 0.9 and min-p 0.05.
CHAT_SAMPLING = SamplingConfig(temperature=0.0, top_k=40, top_p=0.9, min_p=0.05)


@dataclass
class ChatConfig:
    model: str
    tokenizer: Optional[str] = None
    system: str = ""
    threads: int = 0
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def parse_args(argv: Optional[list[str]] = None) -> ChatConfig:
    parser = argparse.ArgumentParser(description="Chat with an exported model through the C engine (librun.so).")
    parser.add_argument("model", help="model .bin written by export.py (v0, v1 or v2)")
    parser.add_argument("-z", "--tokenizer", help="tokenizer .bin (default: the tok*.bin beside the model or in "
                                                  "data/ whose size matches the model's vocabulary)")
    parser.add_argument("-y", "--system", default="", help="system prompt")
    parser.add_argument("--threads", type=int, default=0, help="engine threads (default: the engine's choice)")
    sampling = parser.add_argument_group("sampling (llama.cpp's meanings; applied in this order: penalties, "
                                         "temperature, top-k, top-p, min-p)")
    sampling.add_argument("-t", "--temperature", type=float, default=CHAT_SAMPLING.temperature,
                          help=f"0 = greedy (default {CHAT_SAMPLING.temperature})")
    sampling.add_argument("-k", "--top_k", "--top-k", dest="top_k", type=int, default=CHAT_SAMPLING.top_k,
                          help=f"only the k most probable tokens, 0 = off (default {CHAT_SAMPLING.top_k})")
    sampling.add_argument("-p", "--top_p", "--top-p", dest="top_p", type=float, default=CHAT_SAMPLING.top_p,
                          help=f"nucleus sampling mass, 1 = off (default {CHAT_SAMPLING.top_p})")
    sampling.add_argument("--min_p", "--min-p", dest="min_p", type=float, default=CHAT_SAMPLING.min_p,
                          help="only tokens at least this times as probable as the most probable one, 0 = off "
                               f"(default {CHAT_SAMPLING.min_p})")
    sampling.add_argument("--repeat_penalty", "--repeat-penalty", dest="repeat_penalty", type=float,
                          default=CHAT_SAMPLING.repeat_penalty,
                          help="> 0: the logit of a token among the last --repeat_last_n is divided by it "
                               f"(multiplied when negative), 1 = off (default {CHAT_SAMPLING.repeat_penalty})")
    sampling.add_argument("--repeat_last_n", "--repeat-last-n", dest="repeat_last_n", type=int,
                          default=CHAT_SAMPLING.repeat_last_n,
                          help=f"how many of the context's last tokens the penalties look at, -1 = all "
                               f"(default {CHAT_SAMPLING.repeat_last_n})")
    sampling.add_argument("--presence_penalty", "--presence-penalty", dest="presence_penalty", type=float,
                          default=CHAT_SAMPLING.presence_penalty,
                          help=f"subtracted from the logit of each token among them (default "
                               f"{CHAT_SAMPLING.presence_penalty})")
    sampling.add_argument("--frequency_penalty", "--frequency-penalty", dest="frequency_penalty", type=float,
                          default=CHAT_SAMPLING.frequency_penalty,
                          help=f"subtracted once per time a token is among them (default "
                               f"{CHAT_SAMPLING.frequency_penalty})")
    sampling.add_argument("-n", "--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                          default=CHAT_SAMPLING.max_new_tokens,
                          help="most tokens per answer, 0 = until the context is full (default "
                               f"{CHAT_SAMPLING.max_new_tokens})")
    sampling.add_argument("-s", "--seed", type=int, default=0, help="sampling seed (default: from the clock)")
    args = vars(parser.parse_args(argv))
    settings = SamplingConfig(**{name: args.pop(name) for name in [f.name for f in fields(SamplingConfig)]})
    problems = [message for bad, message in [
        (min(settings.max_new_tokens, settings.temperature, settings.top_k) < 0, "-n, -t and -k must not be negative"),
        (not 0 <= settings.top_p <= 1 or not 0 <= settings.min_p <= 1, "--top_p and --min_p must be in [0, 1]"),
        (settings.repeat_penalty <= 0, "--repeat_penalty must be > 0 (1 = off)"),
        (settings.repeat_last_n < -1, "--repeat_last_n must be >= -1 (-1 = the whole context)")] if bad]
    if problems:
        parser.error(problems[0])
    return ChatConfig(**args, sampling=settings)


@contextmanager
def line_editing(interactive: bool) -> Iterator[None]:
    """readline editing with a history file in the home folder, when there is a terminal and a home."""
    if not interactive:
        yield
        return
    try:
        import readline
    except ImportError:
        yield
        return
    try:
        history: Optional[Path] = Path.home() / HISTORY_FILE
    except (RuntimeError, KeyError):
        history = None
    readline.set_history_length(1000)
    if history is not None:
        try:
            readline.read_history_file(history)
        except OSError:
            pass
    try:
        yield
    finally:
        if history is not None:
            try:
                readline.write_history_file(history)
            except OSError:
                pass


def read_message(interactive: bool) -> str:
    """One message; lines ending in a backslash continue it. Raises EOFError at the end of input."""
    lines: list[str] = []
    while True:
        if interactive:
            line = input(CONTINUATION_PROMPT if lines else PROMPT)
        else:
            line = sys.stdin.readline()
            if not line:
                if lines:
                    break
                raise EOFError
            line = line.rstrip("\r\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)
    return "\n".join(lines)


class ChatSession:
    """The read-answer loop: slash commands, notes, streaming to stdout."""

    def __init__(self, conversation: Conversation, interactive: bool):
        self.conversation = conversation
        self.interactive = interactive

    @staticmethod
    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    @staticmethod
    def note(text: str) -> None:
        sys.stdout.flush()
        print(text, file=sys.stderr, flush=True)

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        conversation = self.conversation
        if name == "/bye":
            return False
        if name in ("/help", "/?"):
            print(HELP, flush=True)
        elif name in ("/clear", "/reset"):
            conversation.reset()
            self.note("(conversation cleared)")
        elif name == "/system":
            if argument:
                conversation.reset(argument)
                self.note("(system prompt set; conversation cleared)")
            else:
                self.note(f"(system prompt: {conversation.system!r})")
        elif name in ("/save", "/load"):
            if not argument:
                raise ChatError(f"usage: {name} FILE")
            path = Path(argument).expanduser()
            if name == "/save":
                save_conversation(conversation, path)
                self.note(f"(saved {len(conversation.exchanges)} turns to {path})")
            else:
                system, exchanges = read_conversation(path, conversation.engine.encode, conversation.engine.eos)
                dropped = conversation.load(system, exchanges)
                if dropped:
                    self.note(dropped_note(dropped))
                self.note(f"(loaded {len(exchanges)} turns from {path})")
        else:
            raise ChatError(f"unknown command {name}; /help lists them")
        return True

    def answer(self, message: str, interrupt: Interrupt) -> None:
        reply = self.conversation.reply(message, self.emit, self.note, interrupt)
        self.emit("\n\n" if self.interactive else "\n")
        if reply.interrupted:
            self.note("(stopped)")
        elif reply.context_full:
            self.note("(answer cut: the context is full)")

    def run(self) -> None:
        while True:
            try:
                message = read_message(self.interactive)
            except EOFError:
                if self.interactive:
                    print(flush=True)
                return
            except KeyboardInterrupt:
                if not self.interactive:
                    raise SystemExit(130)
                print("\nUse Ctrl-D, quit or /bye to leave.", flush=True)
                continue
            stripped = message.strip()
            if not stripped:
                continue
            if stripped.lower() in ("quit", "exit"):
                return
            # Ctrl-C from here to the next prompt only stops the answer: the conversation and cache stay consistent.
            with stop_on_sigint() as interrupt:
                try:
                    if stripped.startswith("/"):
                        if not self.command(stripped):
                            return
                    else:
                        self.answer(message, interrupt)
                except ChatError as e:
                    self.note(f"error: {e}")


def missing(path: Path) -> str:
    """Why path, which is not a regular file, cannot be read (the engine refuses FIFOs and devices too)."""
    return "not found" if not path.exists() else "is not a regular file"


def model_files(model: str, tokenizer: Optional[str]) -> tuple[Path, Path]:
    """The model .bin and its tokenizer .bin (given, or found by find_tokenizer), or exit with what to do."""
    model_path = Path(model)
    if not model_path.is_file():
        raise SystemExit(f"error: model {model_path} {missing(model_path)}; export one with "
                         f"`python export.py {model_path} --checkpoint=out/ckpt.pt`")
    tokenizer_path = Path(tokenizer) if tokenizer else find_tokenizer(model_path)
    if not tokenizer_path.is_file():
        raise SystemExit(f"error: tokenizer {tokenizer_path} {missing(tokenizer_path)}; export one with "
                         "`python tokenizer.py --tokenizer-model=data/tok4096.model`")
    return model_path, tokenizer_path


def main(argv: Optional[list[str]] = None) -> None:
    config = parse_args(argv)
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="replace")
    model_path, tokenizer_path = model_files(config.model, config.tokenizer)
    interactive = sys.stdin.isatty()
    engine = Engine(load_library(library_path()), model_path, tokenizer_path, config.threads)
    try:
        conversation = Conversation(engine, config.sampling, system=config.system)
        if interactive:
            print(f"{model_path.name}: {engine.seq_len} tokens of context, vocabulary {engine.vocab_size} "
                  f"({tokenizer_path}), {engine.isa} kernels. /help for commands.", flush=True)
        with line_editing(interactive):
            ChatSession(conversation, interactive).run()
    except KeyboardInterrupt:  # while loading, before the first prompt
        raise SystemExit(130) from None
    except BrokenPipeError:  # whoever reads stdout stopped (`| head`): end quietly, as a command in a pipeline does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit cannot raise again
        raise SystemExit(1) from None
    finally:
        engine.close()


if __name__ == "__main__":
    main()
