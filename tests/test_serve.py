"""serve.py end to end: a tiny model trained here on a few dialogs, served, and talked to by the `openai` package,
raw HTTP and a real browser (Debian's chromium, driven headless by Playwright).

Answers are checked against PyTorch (greedy tokens, log-probabilities) and against ./run's own output."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import openai
import pytest
import torch

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

from test_chat import Fixture, greedy, memorised_fixture, messages, template  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

API_KEY = "sk-test-key"
SLOTS, QUEUE, MAX_BODY = 2, 1, 1 << 16
SEQ_LEN = 8192  # long enough that a song to the end of the context can be stopped mid-way
SONG = "ля " * 40
DIALOGS = [
    [("user", "Привет"), ("assistant", "Здравствуй! Я Арианна.")],
    [("system", "Отвечай кратко."), ("user", "Привет"), ("assistant", "Привет!")],
    [("user", "Что растёт в лесу?"), ("assistant", "В лесу растёт ёлка.")],
    [("user", "Привет"), ("assistant", "Здравствуй! Я Арианна."),
     ("user", "Что растёт в лесу?"), ("assistant", "В лесу растёт ёлка.")],
    [("user", "Покажи код"), ("assistant", "Вот:\n```python\nprint(1)\n```")],
    [("user", "Покажи тег"), ("assistant", "<script>window.pwned = 1</script> <b>жирный</b>")],
    [("user", "Спой"), ("assistant", SONG)],  # trained without its EOS: the song goes on until it is stopped
]
TOKENIZER_TEXT = [
    "Привет! Здравствуй, я Арианна. Отвечай кратко. Что растёт в лесу? В лесу растёт ёлка.",
    "Покажи код. Вот: ```python\nprint(1)\n``` Покажи тег <script>window.pwned = 1</script> <b>жирный</b>",
    "Спой! " + SONG, "<|system|>\nОтвечай.\n<|user|>\nПривет\n<|assistant|>\nПривет!",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """This module's PyTorch work is tiny: on a busy machine, two threads wait on each other far longer."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    """A model that memorised DIALOGS through the chat template, the song without its EOS."""
    def rows(tokenizer: Tokenizer) -> list[list[int]]:
        rows = [template(tokenizer, d) for d in DIALOGS]
        rows[-1] = rows[-1][:-1]  # the song's EOS
        return rows

    return memorised_fixture(tmp_path_factory.mktemp("serve"), TOKENIZER_TEXT, rows, max_seq_len=SEQ_LEN)


@dataclass
class Server:
    url: str
    port: int
    log: Path

    def log_lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def server(trained: Fixture, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with open(log, "w") as err:
        process = subprocess.Popen(
            [sys.executable, str(REPO_DIR / "serve.py"), str(trained.model_bin), "-z", str(trained.tokenizer_bin),
             "--port=0", f"--slots={SLOTS}", f"--queue={QUEUE}", f"--api_key={API_KEY}", f"--max_body={MAX_BODY}",
             "--threads=1"], stderr=err, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        while not (match := re.search(r"on http://127\.0\.0\.1:(\d+)/", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, f"serve.py did not start: {log.read_text()}"
            time.sleep(0.05)
        port = int(match.group(1))
        yield Server(f"http://127.0.0.1:{port}", port, log)
        assert process.poll() is None, "the server died"
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def run_binary(*args: str) -> str:
    """./run's output (built by make test; `make run` here only when missing or older than run.c)."""
    binary = REPO_DIR / "run"
    if not binary.exists() or binary.stat().st_mtime < (REPO_DIR / "run.c").stat().st_mtime:
        subprocess.run(["make", "-s", "run"], cwd=REPO_DIR, check=True)
    return subprocess.run([str(binary), *args, "-T", "1"], capture_output=True, text=True, input="",
                          check=True, timeout=60).stdout


def request(server: Server, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one raw request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(method, path, body, {"Authorization": f"Bearer {API_KEY}", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    assert b"Traceback" not in data
    return response.status, dict(response.getheaders()), json.loads(data)


def post(server: Server, path: str, body: object, headers: dict | None = None) -> tuple[int, dict, dict]:
    return request(server, "POST", path, json.dumps(body).encode(),
                   {"Content-Type": "application/json", **(headers or {})})


# ----------------------------------------------------------------------------- the openai client

def test_chat_streamed_equals_non_streamed_equals_run(trained: Fixture, client: openai.OpenAI) -> None:
    tok = trained.tokenizer
    prompt = template(tok, [("user", "Привет")])
    expected = tok.decode(greedy(trained.model, prompt, tok.eos_id))
    reply = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Привет"}],
                                           temperature=0)
    assert reply.choices[0].message.content == expected == "Здравствуй! Я Арианна."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(tok.encode(expected, bos=False, eos=False))

    chunks = list(client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Привет"}],
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came in pieces

    assert run_binary(str(trained.model_bin), "-z", str(trained.tokenizer_bin), "-m", "chat", "-i", "Привет",
                      "-t", "0").strip() == expected


def test_completions_logprobs_match_pytorch_and_text_matches_run(trained: Fixture, client: openai.OpenAI) -> None:
    tok = trained.tokenizer
    prompt = [tok.bos_id] + tok.encode("<|user|>\nПокажи код\n<|assistant|>\n", bos=False, eos=False)
    text = "<|user|>\nПокажи код\n<|assistant|>\n"
    reply = client.completions.create(model="model", prompt=text, max_tokens=6, temperature=0, echo=True,
                                      logprobs=2)
    choice = reply.choices[0]
    generated = greedy(trained.model, prompt, tok.eos_id, 6)
    with torch.no_grad():
        logits, _ = trained.model(torch.tensor([prompt + generated]))
    want = torch.log_softmax(logits[0].double(), -1)
    ids = prompt[1:] + generated
    got = choice.logprobs.token_logprobs
    assert len(got) == len(ids) and reply.usage.completion_tokens == 6 and choice.finish_reason == "length"
    assert max(abs(g - want[i, t].item()) for i, (g, t) in enumerate(zip(got, ids))) < 2e-3
    for top, logprob in zip(choice.logprobs.top_logprobs[-6:], got[-6:]):  # greedy: the best is the token taken
        assert len(top) == 2 and max(top.values()) == pytest.approx(logprob)
    run_text = run_binary(str(trained.model_bin), "-z", str(trained.tokenizer_bin), "-i", text, "-t", "0",
                          "-n", str(len(prompt) + 6))
    assert choice.text == run_text[:-1] and choice.text.startswith(text)

    # lm-evaluation-harness's local-completions: token ids, echo, one token, logprobs=1; the first has no context.
    scored = client.completions.create(model="model", prompt=prompt[1:], max_tokens=1, temperature=0, echo=True,
                                       logprobs=1).choices[0].logprobs
    assert scored.token_logprobs[0] is None and len(scored.token_logprobs) == len(prompt)
    with torch.no_grad():
        logits, _ = trained.model(torch.tensor([prompt[1:]]))
    want = torch.log_softmax(logits[0].double(), -1)
    assert all(abs(scored.token_logprobs[i] - want[i - 1, prompt[i + 1]].item()) < 2e-3
               for i in range(1, len(prompt) - 1))


def test_stop_strings_cap_and_seed(trained: Fixture, client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Привет"}]
    reply = client.chat.completions.create(model="m", messages=ask, temperature=0, stop=["Арианна", "zzz"])
    assert reply.choices[0].message.content == "Здравствуй! Я " and reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=ask, temperature=0, stop="Ари", stream=True))
    assert streamed == "Здравствуй! Я "
    short = client.chat.completions.create(model="m", messages=ask, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    sampled = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Спой"}],
                                              temperature=2, seed=5, max_tokens=30).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_penalties_and_extra_samplers_are_run_cs(trained: Fixture, client: openai.OpenAI) -> None:
    """presence/frequency penalties (OpenAI's) and llama-server's repeat_penalty, top_k, min_p reach the engine's
    one sampler: greedy answers equal PyTorch's generate() with the same settings, and differ from the plain one."""
    tok = trained.tokenizer
    prompt = template(tok, [("user", "Спой")])
    plain = tok.decode(greedy(trained.model, prompt, tok.eos_id, 20))
    answers = []
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repeat_penalty": 10.0, "repeat_last_n": -1}):
        ids = trained.model.generate(torch.tensor([prompt]), 20, temperature=0.0, eos_id=tok.eos_id,
                                     repeat_last_n=extra.pop("repeat_last_n", 64), **extra)[0, len(prompt):].tolist()
        want = tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)
        body = {**extra, **({"repeat_last_n": -1} if "repeat_penalty" in extra else {})}
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Спой"}],
                                               temperature=0, max_tokens=20, extra_body=body)
        assert reply.choices[0].message.content == want, extra
        answers.append(want)
    assert answers[-1] != plain  # the memorised "ля ля ..." resists OpenAI's penalties (at most 2), not this one
    sampled = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Спой"}],
                                             temperature=2, seed=3, max_tokens=20,
                                             extra_body={"top_k": 1, "min_p": 0.5})
    assert sampled.choices[0].message.content == plain  # top_k 1 keeps only the greedy token


def test_conversation_reuses_the_cached_prefix(trained: Fixture, client: openai.OpenAI) -> None:
    tok = trained.tokenizer
    first = [{"role": "system", "content": "Отвечай кратко."}, {"role": "user", "content": "Привет"}]
    client.chat.completions.create(model="m", messages=first, temperature=0)
    # Occupy the other slot so the next turn cannot land on an empty one by chance.
    other = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Покажи код"}],
                                           temperature=0)
    assert other.choices[0].message.content == "Вот:\n```python\nprint(1)\n```"
    pairs = [("user", "Привет"), ("assistant", "Здравствуй! Я Арианна."), ("user", "Что растёт в лесу?")]
    turn1 = client.chat.completions.create(model="m", messages=messages(pairs[:1]), temperature=0)
    turn2 = client.chat.completions.create(model="m", messages=messages(pairs), temperature=0)
    prompt2 = template(tok, pairs)
    assert turn2.usage.prompt_tokens_details.cached_tokens == turn1.usage.prompt_tokens + \
        turn1.usage.completion_tokens
    assert turn2.choices[0].message.content == tok.decode(greedy(trained.model, prompt2, tok.eos_id)) \
        == "В лесу растёт ёлка."


def test_trim_history_leaves_room_for_a_whole_reply(trained: Fixture, server: Server) -> None:
    """"trim_history" (the web chat's) drops the oldest exchanges until the reply cap, at most 3/4 of the context,
    fits after the rest, as chat.py does; without it the whole history is answered, as OpenAI's API does."""
    tok, cap = trained.tokenizer, 6000
    pairs = [("user", "Спой"), ("assistant", "ля " * 2500), ("user", "Что растёт в лесу?")]
    assert len(template(tok, pairs)) + 1 <= SEQ_LEN < len(template(tok, pairs)) + cap + 1
    ask = {"messages": messages(pairs), "max_tokens": cap, "temperature": 0}
    status, _, reply = post(server, "/v1/chat/completions", {**ask, "trim_history": True})
    assert status == 200 and reply["dropped_turns"] == 1
    assert reply["choices"][0]["message"]["content"] == tok.decode(
        greedy(trained.model, template(tok, pairs[2:]), tok.eos_id)) == "В лесу растёт ёлка."
    assert reply["usage"]["prompt_tokens"] == len(template(tok, pairs[2:]))
    status, _, reply = post(server, "/v1/chat/completions", ask)
    assert status == 200 and "dropped_turns" not in reply
    assert reply["usage"]["prompt_tokens"] == len(template(tok, pairs))


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["model"]
    status, _, body = request(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and body["status"] == "ok" and body["slots_idle"] == SLOTS


# ----------------------------------------------------------------------------- errors and load

def test_errors_have_openai_shape(server: Server) -> None:
    def check(status: int, code: str, got: tuple[int, dict, dict]) -> dict:
        assert got[0] == status, got
        error = got[2]["error"]
        assert error["code"] == code and error["message"] and error["type"], got
        return got[1]

    chat_path = "/v1/chat/completions"
    ask = {"messages": [{"role": "user", "content": "Привет"}], "max_tokens": 1}
    check(400, "invalid_json", request(server, "POST", chat_path, b"{not json"))
    check(413, "request_too_large", request(server, "POST", chat_path, b" " * (MAX_BODY + 1)))
    check(400, "unknown_parameter", post(server, chat_path, {**ask, "temprature": 0.5}))
    check(400, "invalid_type", post(server, chat_path, {**ask, "temperature": "hot"}))
    check(400, "invalid_type", post(server, chat_path, {**ask, "max_tokens": 1.5}))
    check(400, "invalid_value", post(server, chat_path, {**ask, "top_p": 3}))
    check(400, "missing_required_parameter", post(server, chat_path, {"max_tokens": 1}))
    check(400, "unsupported_value", post(server, chat_path, {**ask, "tools": [{"type": "function"}]}))
    assert post(server, chat_path, {**ask, "logprobs": False, "tools": []})[0] == 200  # defaults clients send
    check(400, "invalid_type", request(server, "POST", chat_path, b"[1, 2]"))
    check(400, "invalid_value", post(server, chat_path, {"messages": [{"role": "robot", "content": "x"}]}))
    check(400, "context_length_exceeded", post(server, chat_path, {"messages": [
        {"role": "user", "content": "中" * (SEQ_LEN // 3)}]}))  # three byte tokens each
    check(400, "context_length_exceeded", post(server, "/v1/completions", {"prompt": [5] * (SEQ_LEN + 1)}))
    check(400, "invalid_value", post(server, "/v1/completions", {"prompt": [10 ** 6]}))
    assert check(401, "invalid_api_key", post(server, chat_path, ask, headers={"Authorization": "Bearer nope"}))[
        "WWW-Authenticate"] == "Bearer"
    check(401, "invalid_api_key", request(server, "GET", "/v1/models", headers={"Authorization": ""}))
    check(404, "not_found", request(server, "GET", "/v2/nothing"))
    check(405, "method_not_allowed", request(server, "GET", chat_path))
    assert request(server, "GET", "/health")[0] == 200


def start_stream(server: Server, content: str = "Спой") -> socket.socket:
    """A streaming chat request on a raw socket, returned once its first event has arrived (it holds a slot)."""
    body = json.dumps({"messages": [{"role": "user", "content": content}], "temperature": 0,
                       "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (API_KEY.encode(), len(body), body))
    received = b""
    while b"data: " not in received:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200"), received
    return sock


def wait_for(server: Server, condition, what: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = request(server, "GET", "/health")[2]
        if condition(health):
            return health
        assert time.monotonic() < deadline, f"{what}: {health}"
        time.sleep(0.02)


def test_full_queue_gets_503_and_disconnects_free_slots(server: Server) -> None:
    streams = [start_stream(server) for _ in range(SLOTS)]
    wait_for(server, lambda h: h["slots_idle"] == 0, "both slots busy")
    body = json.dumps({"messages": [{"role": "user", "content": "Привет"}]}).encode()
    queued = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    queued.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (API_KEY.encode(), len(body), body))
    wait_for(server, lambda h: h["queued"] == 1, "one request waiting")
    status, headers, error = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 503 and headers["Retry-After"] == "1" and error["error"]["code"] == "server_busy"
    queued.close()  # the waiting client leaves: it leaves the queue
    wait_for(server, lambda h: h["queued"] == 0, "the queue emptied")
    for sock in streams:  # the song would go on for the whole context: closing frees the slot at once
        sock.close()
    wait_for(server, lambda h: h["slots_idle"] == SLOTS, "slots freed", timeout=2)
    cut = [line for line in server.log_lines() if " POST /v1/chat/completions 499 " in line]
    assert len(cut) >= SLOTS + 1
    assert all(int(line.split()[4]) < SEQ_LEN // 2 for line in cut[-SLOTS:])  # tokens made before the cut


def test_one_log_line_per_request(server: Server) -> None:
    """A request's line is written once its handler returns, which can be just after the client has its answer:
    wait for the lines (bounded), then each request must have exactly one."""
    before = len(server.log_lines())
    post(server, "/v1/completions", {"prompt": "<|user|>\nПривет\n<|assistant|>\n", "max_tokens": 3,
                                       "temperature": 0})
    request(server, "GET", "/v1/models")
    patterns = [r"\S+ POST /v1/completions 200 3 tokens \d+ ms", r"\S+ GET /v1/models 200 0 tokens \d+ ms"]
    deadline = time.monotonic() + 10
    while True:
        lines = server.log_lines()[before:]
        found = [[line for line in lines if re.fullmatch(pattern, line)] for pattern in patterns]
        if all(found) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [len(matches) for matches in found] == [1, 1], lines


# ----------------------------------------------------------------------------- the web chat in a browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_web_chat_in_chromium(server: Server, tmp_path: Path) -> None:
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(server.url + "/")
            page.click("#settings-button")
            page.fill("#api-key", API_KEY)
            page.fill("#temperature", "0")
            answers = page.locator(".msg.assistant")

            def say(text: str) -> None:
                page.fill("#input", text)
                page.press("#input", "Enter")

            say("Привет")
            expect(answers.nth(0)).to_have_text("Здравствуй! Я Арианна.", timeout=20_000)
            expect(page.locator("#send")).to_be_enabled()
            say("Что растёт в лесу?")  # the conversation kept in the page: the second turn sees the first
            expect(answers.nth(1)).to_have_text("В лесу растёт ёлка.", timeout=20_000)

            def new_chat() -> None:
                page.click("#new-chat")
                expect(page.locator("#log .msg")).to_have_count(0)

            new_chat()
            say("Покажи тег")
            expect(answers.nth(0)).to_have_text("<script>window.pwned = 1</script> <b>жирный</b>", timeout=20_000)
            assert page.evaluate("typeof window.pwned") == "undefined"
            assert page.locator("#log script, #log b").count() == 0
            new_chat()
            say("Покажи код")
            expect(page.locator("#log pre code")).to_have_text("print(1)", timeout=20_000)
            expect(answers.nth(0)).to_contain_text("Вот:")

            new_chat()
            say("Спой")  # a song to the end of the context: stopped mid-answer
            song = answers.nth(0)
            expect(song).to_contain_text("ля ля", timeout=20_000)
            page.click("#stop")
            expect(song.locator(".note")).to_have_text("(stopped)")
            stopped = song.inner_text()
            assert stopped.count("ля") < SEQ_LEN // 2
            wait_for(server, lambda h: h["slots_idle"] == SLOTS, "the stopped answer's slot freed", timeout=5)
            assert song.inner_text() == stopped

            shot = Image.open(io.BytesIO(page.screenshot())).convert("L")
            dark = sum(count for count, level in shot.getcolors(256) if level < 128)
            assert dark > 500 and len(shot.getcolors(256)) > 10, "the screenshot is blank"

            new_chat()
            page.fill("#system", "Отвечай кратко.")
            say("Привет")
            expect(answers.nth(0)).to_have_text("Привет!", timeout=20_000)
            assert not errors, errors
        finally:
            browser.close()
