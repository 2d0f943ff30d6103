"""chat.py end to end: a tiny tokenizer and model trained here, exported, and chatted with through a pseudo-terminal.

Every answer is checked against greedy decoding of the same weights in PyTorch on the chat template's tokens,
which proves the template, the KV-cache multi-turn bookkeeping and the UTF-8 streaming at once.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

import chat  # noqa: E402
from export import export_model  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from tokenizer import Tokenizer, encode_dialog  # noqa: E402

CHAT_PY = REPO_DIR / "chat.py"
TIMEOUT_S = 20.0
# "ё" is left out of the tokenizer's training text, so it is spelled with two byte-fallback tokens.
DIALOGS = [
    [("user", "Привет"), ("assistant", "Здравствуй! Я Арианна.")],
    [("user", "Что растёт в лесу?"), ("assistant", "В лесу растёт ёлка.")],
    [("user", "What is a tokenizer?"), ("assistant", "A tokenizer splits text into pieces.")],
    [("system", "Отвечай кратко."), ("user", "Привет"), ("assistant", "Привет!")],
    [("user", "Строка один\nстрока два"), ("assistant", "Две строки.")],
    [("user", "Привет"), ("assistant", "Здравствуй! Я Арианна."),
     ("user", "Что растёт в лесу?"), ("assistant", "В лесу растёт ёлка.")],
]
TOKENIZER_TEXT = [
    "Привет! Как дела? Здравствуй, я Арианна. Отвечай кратко.",
    "Резонанс — это отклик системы на частоту. Что такое резонанс?",
    "Токенизатор делит текст на части. Модель учится предсказывать следующий токен.",
    "В лесу растут деревья. Что растет в лесу? Строка один, строка два. Две строки.",
    "Hello! What is a tokenizer? A tokenizer splits text into pieces.",
    "<|system|>\nТы помощник.\n<|user|>\nПривет\n<|assistant|>\nПривет!",
]
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def messages(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


@dataclass
class Fixture:
    tokenizer: Tokenizer
    model: Transformer
    model_bin: Path
    tokenizer_bin: Path


def memorised_fixture(folder: Path, tokenizer_text: list[str], rows: Callable[[Tokenizer], list[list[int]]],
                      max_seq_len: int) -> Fixture:
    """A 400-token BPE tokenizer trained on tokenizer_text and a 2-layer model that memorised rows(tokenizer), both
    exported for the engine into folder."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_text * 10), model_prefix=str(folder / "tok400"), model_type="bpe",
        vocab_size=400, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    tokenizer = Tokenizer(folder / "tok400.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                  max_seq_len=max_seq_len))
    memorise(model, rows(tokenizer))
    chat.library_path()  # build librun.so once, before chat.py processes could race to build it
    return Fixture(tokenizer, model, export_model(model, folder / "model.bin", version=1),
                   tokenizer.export(folder / "tok400.bin"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    """A model that memorised DIALOGS through the chat template."""
    return memorised_fixture(tmp_path_factory.mktemp("chat"), TOKENIZER_TEXT,
                             lambda tokenizer: [template(tokenizer, d) for d in DIALOGS], max_seq_len=128)


def memorise(model: Transformer, rows: list[list[int]], steps: int = 150) -> None:
    """Train model on rows of tokens (padded) until it reproduces them; leaves it in eval mode."""
    width = max(map(len, rows))
    tokens = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    targets = torch.tensor([row[1:] + [-1] * (width - len(row) + 1) for row in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _, loss = model(tokens, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert loss.item() < 0.05, f"the tiny model did not memorise its dialogs (loss {loss.item():.3f})"


def greedy(model: Transformer, prompt: list[int], eos_id: int, max_new_tokens: int = 60) -> list[int]:
    """PyTorch's greedy continuation of prompt, without the closing EOS."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens, temperature=0.0, eos_id=eos_id)[0, len(prompt):]
    ids = out.tolist()
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def template(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[int]:
    encode = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
    return encode_dialog(encode, messages(pairs), tokenizer.bos_id, tokenizer.eos_id)[0]


def child_env(home: Path) -> dict[str, str]:
    return dict(os.environ, HOME=str(home), TERM="dumb", INPUTRC="/dev/null", LANG="C.UTF-8", LC_ALL="C.UTF-8",
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class PtyChat:
    """chat.py on a pseudo-terminal that is its controlling terminal, so \\x03 raises SIGINT as a keyboard does."""

    # Session leader + TIOCSCTTY: the pty becomes the controlling terminal and the child its foreground group.
    # SIGINT back to its default: a suite started in the background (`make test &`) ignores it, children inherit
    # that, and a Python that starts with SIGINT ignored never raises KeyboardInterrupt.
    LAUNCH = ("import fcntl,os,signal,sys,termios; signal.signal(signal.SIGINT, signal.SIG_DFL); "
              "fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])")

    def __init__(self, args: list[str], home: Path):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.LAUNCH, sys.executable, str(CHAT_PY), *args],
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=child_env(home), cwd=home)
        os.close(slave)
        self.buffer = b""

    def send(self, text: str) -> None:
        os.write(self.master, text.encode("utf-8"))

    def expect(self, pattern: str, timeout: float = TIMEOUT_S) -> str:
        """Everything up to and including the first `pattern`, consumed; CRLF as \\n, ANSI escapes removed."""
        wanted = pattern.replace("\n", "\r\n").encode("utf-8")  # the terminal turns \n into \r\n
        deadline = time.monotonic() + timeout
        while wanted not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.master], [], [], remaining)[0]:
                raise AssertionError(f"no {pattern!r} within {timeout} s; got {self.tail()!r}")
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"chat.py ended before {pattern!r}; got {self.tail()!r}")
            self.buffer += chunk
        end = self.buffer.index(wanted) + len(wanted)
        text, self.buffer = self.buffer[:end], self.buffer[end:]
        return ANSI_ESCAPE.sub("", text.decode("utf-8")).replace("\r\n", "\n")

    def expect_output(self, timeout: float = TIMEOUT_S) -> None:
        """Wait until something more has been printed."""
        if not self.buffer and select.select([self.master], [], [], timeout)[0]:
            self.buffer += os.read(self.master, 65536)
        assert self.buffer, f"nothing printed within {timeout} s"

    def interrupt(self) -> None:
        """Ctrl-C while the program is surely mid-answer: stopped, so the SIGINT waits until it runs again."""
        os.kill(self.process.pid, signal.SIGSTOP)
        self.send("\x03")
        os.kill(self.process.pid, signal.SIGCONT)

    def tail(self) -> str:
        return self.buffer[-600:].decode("utf-8", "replace")

    def ask(self, line: str) -> str:
        """Send one line and return the answer printed before the next prompt."""
        self.send(line + "\r")
        output = self.expect("\n>>> ")
        echoed, _, rest = output.partition("\n")
        assert echoed.endswith(line.split("\n")[-1]), f"{line!r} not echoed: {output!r}"
        assert rest.endswith("\n\n>>> "), output
        return rest[:-len("\n\n>>> ")]

    def wait(self, timeout: float = TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def start_chat(tmp_path: Path):
    sessions: list[PtyChat] = []

    def start(*args: str) -> PtyChat:
        session = PtyChat(list(args), tmp_path)
        sessions.append(session)
        session.expect(">>> ")
        return session

    yield start
    for session in sessions:
        if session.process.returncode is None:
            session.close()


def run_piped(args: list[str], stdin: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHAT_PY), *args], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", env=child_env(home), cwd=home, timeout=TIMEOUT_S)


def test_text_stream_waits_for_whole_utf8_characters() -> None:
    stream = chat.TextStream()
    assert stream.push(b" \xd0") == ""  # leading dummy-prefix space dropped, half a character held back
    assert stream.push(b"\x81\xd1") == "Ё"
    assert stream.push(b"\x91\x1b[2J\tok\n") == "ё[2J\tok\n"  # the escape character is not passed to the terminal
    assert stream.push(b"\xd1") + stream.finish() == "\ufffd"


def test_two_russian_turns_stream_what_pytorch_greedy_decodes(trained: Fixture, start_chat) -> None:
    tok, model = trained.tokenizer, trained.model
    # A reply cap of 40 keeps the history: without one, 3/4 of the context is kept free for the next reply.
    session = start_chat(str(trained.model_bin), "-z", str(trained.tokenizer_bin), "-t", "0", "-n", "40",
                         "--threads=1")

    prompt1 = template(tok, [("user", "Привет")])
    answer1_ids = greedy(model, prompt1, tok.eos_id)
    answer1 = session.ask("Привет")
    assert answer1 == tok.decode(answer1_ids) == "Здравствуй! Я Арианна."

    # The second turn continues the cache: the first answer's own tokens, its EOS, then the new user segment.
    prompt2 = prompt1 + answer1_ids + [tok.eos_id] + template(tok, [("user", "Что растёт в лесу?")])[1:]
    answer2 = session.ask("Что растёт в лесу?")
    assert answer2 == tok.decode(greedy(model, prompt2, tok.eos_id)) == "В лесу растёт ёлка."

    session.send("quit\r")
    assert session.wait() == 0


def test_slash_commands_and_multiline_input(trained: Fixture, start_chat, tmp_path: Path) -> None:
    tok, model = trained.tokenizer, trained.model
    session = start_chat(str(trained.model_bin), f"--tokenizer={trained.tokenizer_bin}", "-t", "0", "-n", "60")

    def expected(pairs: list[tuple[str, str]]) -> str:
        return tok.decode(greedy(model, template(tok, pairs), tok.eos_id))

    first = session.ask("Привет")
    assert first == expected([("user", "Привет")])
    session.ask("Что растёт в лесу?")

    session.send("/reset\r")
    assert "(conversation cleared)" in session.expect(">>> ")
    assert session.ask("Привет") == first  # nothing of the earlier turns is left in the cache

    session.send("/system Отвечай кратко.\r")
    assert "system prompt set" in session.expect(">>> ")
    assert session.ask("Привет") == expected([("system", "Отвечай кратко."), ("user", "Привет")]) == "Привет!"

    session.send("/reset\r")
    session.expect(">>> ")
    session.send("Строка один\\\r")
    session.expect("... ")
    two_lines = session.ask("строка два")
    assert two_lines == expected([("system", "Отвечай кратко."), ("user", "Строка один\nстрока два")])

    saved = tmp_path / "dialog.json"
    session.send(f"/save {saved}\r")
    assert "saved 1 turns" in session.expect(">>> ")
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data == {"system": "Отвечай кратко.", "messages": [
        {"role": "user", "content": "Строка один\nстрока два"}, {"role": "assistant", "content": two_lines}]}

    # /load feeds the saved history again: the next answer is the one the template gives for history + question.
    data["system"] = ""
    data["messages"] = messages([("user", "Привет"), ("assistant", "Здравствуй! Я Арианна.")])
    saved.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    session.send("/reset\r")
    session.expect(">>> ")
    session.send(f"/load {saved}\r")
    assert "loaded 1 turns" in session.expect(">>> ")
    history = [("user", "Привет"), ("assistant", "Здравствуй! Я Арианна."), ("user", "Что растёт в лесу?")]
    assert session.ask("Что растёт в лесу?") == expected(history) == "В лесу растёт ёлка."

    session.send("/load missing.json\r")
    assert "error: cannot read missing.json" in session.expect(">>> ")
    session.send("/help\r")
    assert "/system" in session.expect(">>> ")
    session.send("/bye\r")
    assert session.wait() == 0


def test_ctrl_c_stops_the_answer_not_the_program(trained: Fixture, start_chat, tmp_path: Path) -> None:
    # A model that never says EOS (its embedding row is zero, so its logit is 0, below the best one) and takes
    # seconds to fill its 4096 positions, so its answer is still streaming when Ctrl-C arrives.
    torch.manual_seed(1)
    endless = Transformer(ModelArgs(dim=256, n_layers=6, n_heads=4, vocab_size=trained.tokenizer.n_words,
                                    max_seq_len=4096))
    with torch.no_grad():
        endless.tok_embeddings.weight[trained.tokenizer.eos_id] = 0.0
    model_bin = export_model(endless, tmp_path / "endless.bin", version=1)
    session = start_chat(str(model_bin), "-z", str(trained.tokenizer_bin), "-t", "0", "-n", "0", "--threads", "1")

    session.send("Привет\r")
    session.expect("Привет\n")
    session.expect_output()  # the answer is streaming
    session.interrupt()
    assert "(answer cut" not in session.expect("(stopped)")
    session.expect(">>> ")

    session.send("Что растёт в лесу?\r")  # the conversation goes on after the interrupted answer
    session.expect("лесу?\n")
    session.expect_output()
    session.interrupt()
    assert "(answer cut" not in session.expect("(stopped)")
    session.expect(">>> ")

    session.send("half a line")
    session.expect("half a line")  # typed, as a person would, before pressing Ctrl-C
    # ...a moment later: CPython's readline notices a signal only when it interrupts its select(), so a Ctrl-C that
    # lands while it is still echoing the last key waits for the next key (a race no typist can hit).
    time.sleep(0.5)
    session.send("\x03")  # at the prompt: the line is dropped, the program stays
    session.expect("Use Ctrl-D")
    session.expect(">>> ")
    saved = tmp_path / "stopped.json"
    session.send(f"/save {saved}\r")
    session.expect(">>> ")
    kept = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    assert [m["role"] for m in kept] == ["user", "assistant"] * 2
    assert kept[0]["content"] == "Привет" and kept[1]["content"]  # what streamed before Ctrl-C is kept
    session.send("\x04")  # Ctrl-D
    assert session.wait() == 0


def test_piped_stdin_finds_the_matching_tokenizer(trained: Fixture, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    model_bin = folder / "model.bin"
    model_bin.write_bytes(trained.model_bin.read_bytes())
    (folder / "tok400.bin").write_bytes(trained.tokenizer_bin.read_bytes())
    result = run_piped([str(model_bin), "-t", "0"], "Привет\nЧто растёт в лесу?\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Здравствуй! Я Арианна.\nВ лесу растёт ёлка.\n"


def test_sampling_flags_reach_the_engine(trained: Fixture, tmp_path: Path) -> None:
    """Greedy answers with repeat, presence and frequency penalties over the whole context (the template and the
    first exchange included) equal model.generate with the same settings on the same tokens. (Penalties so heavy
    that the answer turns to noise leave near-ties between tokens, which PyTorch's and the engine's float32 sums,
    in different orders, may break apart: 8 / 2 / 1 did so on AVX2 kernels; these do not.)"""
    tok, flags = trained.tokenizer, dict(repeat_penalty=3.0, repeat_last_n=-1, presence_penalty=1.0,
                                         frequency_penalty=0.5)
    cli = [x for name, value in flags.items() for x in (f"--{name}", str(value))]
    result = run_piped([str(trained.model_bin), "-z", str(trained.tokenizer_bin), "-t", "0", "-n", "60", *cli],
                       "Привет\nЧто растёт в лесу?\n", tmp_path)  # -n 60 leaves the first exchange in view
    assert result.returncode == 0, result.stderr

    def answer(prompt: list[int]) -> list[int]:
        out = trained.model.generate(torch.tensor([prompt]), 60, temperature=0.0, eos_id=tok.eos_id, **flags)
        ids = out[0, len(prompt):].tolist()
        return ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids

    first = answer(template(tok, [("user", "Привет")]))
    second = answer(template(tok, [("user", "Привет")]) + first + [tok.eos_id]
                    + template(tok, [("user", "Что растёт в лесу?")])[1:])
    plain = greedy(trained.model, template(tok, [("user", "Привет")]), tok.eos_id)
    assert result.stdout != tok.decode(plain) + "\nВ лесу растёт ёлка.\n"  # the flags matter
    assert result.stdout == tok.decode(first) + "\n" + tok.decode(second) + "\n"


def test_a_reader_that_stops_early_ends_it_quietly(trained: Fixture, tmp_path: Path) -> None:
    """chat.py | head -1: the answers after the first go to a closed pipe; no BrokenPipeError traceback."""
    messages = tmp_path / "messages.txt"
    messages.write_text("Привет\n" * 3000, encoding="utf-8")  # more answers than a pipe buffers: chat.py is still
    with open(messages, "rb") as stdin:                         # writing when the reader leaves
        process = subprocess.Popen(
            [sys.executable, str(CHAT_PY), str(trained.model_bin), "-z", str(trained.tokenizer_bin), "-t", "0",
             "-n", "40"],  # no history dropped, so no note on stderr
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(tmp_path), cwd=tmp_path)
    assert process.stdout.readline().decode() == "Здравствуй! Я Арианна.\n"
    process.stdout.close()  # as head does after its line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=TIMEOUT_S) == 1
    assert stderr == "", stderr


def test_bad_files_are_one_line_errors(trained: Fixture, tmp_path: Path) -> None:
    # A tokenizer .bin with the first 300 of the 400 tokens.
    data = trained.tokenizer_bin.read_bytes()
    offset = 4
    for _ in range(300):
        offset += 8 + struct.unpack_from("<i", data, offset + 4)[0]
    short_tokenizer = tmp_path / "tok300.bin"
    short_tokenizer.write_bytes(data[:offset])

    cases = [
        ([str(trained.model_bin), "-z", str(short_tokenizer)], "300"),
        ([str(tmp_path / "missing.bin"), "-z", str(trained.tokenizer_bin)], "missing.bin"),
        ([str(trained.model_bin), "-z", str(tmp_path / "missing_tok.bin")], "missing_tok.bin"),
        ([str(trained.model_bin), "-z", str(trained.tokenizer_bin), "--threads", "100000"], "1024"),
    ]
    for args, named in cases:
        result = run_piped(args, "Привет\n", tmp_path)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and named in result.stderr and "Traceback" not in result.stderr
        assert result.stdout == ""

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.bin").write_bytes(trained.model_bin.read_bytes())
    (alone / "tok300.bin").write_bytes(short_tokenizer.read_bytes())
    result = run_piped([str(alone / "model.bin")], "", alone)
    assert result.returncode == 1 and "no tokenizer with 400 tokens" in result.stderr and "-z" in result.stderr


def test_history_longer_than_the_context_drops_the_oldest_turns(trained: Fixture, tmp_path: Path) -> None:
    tok = trained.tokenizer
    short = Transformer(ModelArgs(**{**trained.model.args.to_dict(), "max_seq_len": 96}))
    short.load_state_dict(trained.model.state_dict())
    short.eval()
    model_bin = export_model(short, tmp_path / "short.bin", version=1)

    questions = ["Привет", "Что растёт в лесу?", "Привет"]
    result = run_piped([str(model_bin), "-z", str(trained.tokenizer_bin), "-t", "0", "-n", "24"],  # room for 24
                       "\n".join(questions) + "\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("(context full: dropped the oldest 1 turn)") == 1

    # What the cache must hold for the third answer: the second exchange fed again from scratch, then the question.
    first_prompt = template(tok, [("user", questions[0])])
    first = greedy(short, first_prompt, tok.eos_id)
    second = greedy(short, first_prompt + first + [tok.eos_id] + template(tok, [("user", questions[1])])[1:],
                    tok.eos_id)
    third_prompt = (template(tok, [("user", questions[1])]) + second + [tok.eos_id]
                    + template(tok, [("user", questions[2])])[1:])
    third = greedy(short, third_prompt, tok.eos_id, max_new_tokens=24)
    assert result.stdout == "".join(tok.decode(ids) + "\n" for ids in (first, second, third))

    # Without a reply cap, 3/4 of the context is kept free for each reply: here no earlier exchange leaves that much,
    # so every question is answered as if it came alone (the default chat model answers so; see Conversation).
    result = run_piped([str(model_bin), "-z", str(trained.tokenizer_bin), "-t", "0"], "\n".join(questions) + "\n",
                       tmp_path)
    assert result.returncode == 0 and result.stderr.count("(context full: dropped the oldest 1 turn)") == 2
    alone = [greedy(short, template(tok, [("user", question)]), tok.eos_id) for question in questions]
    assert result.stdout == "".join(tok.decode(ids) + "\n" for ids in alone)
