"""Load on serve.py: CLIENTS clients for SECONDS against --slots SLOTS, over loopback.

    python bench/bench_serve.py [MODEL.bin -z TOK.bin] [--clients 16] [--seconds 30] [--slots 4] [--max_tokens 64]

Without a model it builds one with random weights (dim 288, 6 layers, vocabulary 512 from a tokenizer trained on
README.md), so generation runs to max_tokens. Each client loops: a chat request (every other one streamed, every
third one continuing its previous conversation, so the slots' prefix reuse is exercised), and after a 503 waits
the Retry-After it was given. Prints every status seen, p50/p95 latency, generated tokens/s and the server's
memory after a warm-up and after the run; exits non-zero if a request was lost (neither answered nor refused with
503) or the memory grew by more than 10%.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is a tokenizer?", "Расскажи о резонансе.", "Write a loop in C.", "Что такое модель?",
             "How does training work?", "Explain the KV cache."]


def random_model(folder: Path) -> tuple[Path, Path]:
    """A tokenizer trained on README.md and a model with random weights, exported beside it."""
    sys.path.insert(0, str(REPO_DIR))
    import sentencepiece as spm
    import torch

    from export import export_model
    from model import ModelArgs, Transformer
    from tokenizer import Tokenizer

    lines = [line for line in (REPO_DIR / "README.md").read_text(encoding="utf-8").splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tok512"), model_type="bpe", vocab_size=512,
        byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    tokenizer = Tokenizer(folder / "tok512.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=512, max_seq_len=512))
    return export_model(model, folder / "model.bin", version=2), tokenizer.export(folder / "tok512.bin")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@dataclass
class Stats:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def one_request(port: int, body: dict) -> tuple[int, dict, str, float]:
    """(status, headers, answer text, seconds) of one chat request; a stream is read to its [DONE]."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read().decode("utf-8")
        headers = dict(response.getheaders())
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    if response.status != 200:
        return response.status, headers, data, elapsed
    if not body.get("stream"):
        return 200, headers, data, elapsed
    events = [line[6:] for line in data.split("\n\n") if line.startswith("data: ")]
    if events[-1] != "[DONE]":
        raise RuntimeError("a stream ended without data: [DONE]")
    usage = json.loads(events[-2])["usage"]
    return 200, headers, json.dumps({"usage": usage}), elapsed


def client(index: int, port: int, deadline: float, max_tokens: int, stats: Stats) -> None:
    history: list[dict] = []
    turn = 0
    while time.monotonic() < deadline:
        turn += 1
        if turn % 3 == 0 and history:
            history += [{"role": "user", "content": QUESTIONS[(index + turn) % len(QUESTIONS)]}]
        else:
            history = [{"role": "user", "content": QUESTIONS[(index + turn) % len(QUESTIONS)]}]
        body = {"messages": history, "max_tokens": max_tokens, "temperature": 0.8, "seed": index * 1000 + turn}
        if turn % 2:
            body.update(stream=True, stream_options={"include_usage": True})
        with stats.lock:
            stats.sent += 1
        try:
            status, headers, data, elapsed = one_request(port, body)
        except Exception as e:  # counted as lost
            with stats.lock:
                stats.failures.append(f"{type(e).__name__}: {e}")
            continue
        with stats.lock:
            stats.statuses[status] += 1
            if status == 200:
                stats.latencies.append(elapsed)
                stats.tokens += json.loads(data)["usage"]["completion_tokens"]
            elif status != 503:
                stats.failures.append(f"HTTP {status}: {data[:200]}")
        if status == 503:
            time.sleep(float(headers.get("Retry-After", "1")))
        elif status == 200 and not body.get("stream"):
            answer = json.loads(data)["choices"][0]["message"]["content"]
            history = history + [{"role": "assistant", "content": answer}]
        else:
            history = []


def load(port: int, clients: int, seconds: float, max_tokens: int) -> tuple[Stats, float]:
    stats = Stats()
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i, port, started + seconds, max_tokens, stats))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return stats, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="model .bin (default: a random one built here)")
    parser.add_argument("-z", "--tokenizer", help="tokenizer .bin of the model")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, tokenizer = Path(args.model), Path(args.tokenizer) if args.tokenizer else None
        else:
            model, tokenizer = random_model(Path(tmp))
        log_path = Path(tmp) / "server.log"
        command = [sys.executable, str(REPO_DIR / "serve.py"), str(model), "--port=0", f"--slots={args.slots}"]
        command += ["-z", str(tokenizer)] if tokenizer else []
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stderr=log, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not (match := re.search(r"on http://[^:]+:(\d+)/", log_path.read_text())):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"error: serve.py did not start:\n{log_path.read_text()}")
                time.sleep(0.1)
            port = int(match.group(1))
            print(f"serve.py --slots {args.slots}: {args.clients} clients, max_tokens {args.max_tokens}; CPU: "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
            load(port, args.clients, min(5.0, args.seconds), args.max_tokens)  # warm-up: every thread and buffer
            before = rss_mib(server.pid)
            stats, elapsed = load(port, args.clients, args.seconds, args.max_tokens)
            after = rss_mib(server.pid)
            alive = server.poll() is None
        finally:
            server.kill()
            server.wait()
        lines = log_path.read_text().splitlines()
    answered, refused = stats.statuses[200], stats.statuses[503]
    lost = stats.sent - answered - refused
    latencies = sorted(stats.latencies)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else float("nan")
    print(f"{elapsed:.1f} s: {stats.sent} requests, {answered} answered, {refused} refused with 503, {lost} lost "
          f"({dict(stats.statuses)})")
    print(f"latency of answered requests: p50 {statistics.median(latencies) if latencies else float('nan'):.2f} s, "
          f"p95 {p95:.2f} s")
    print(f"generated {stats.tokens} tokens: {stats.tokens / elapsed:.1f} tokens/s in all")
    print(f"server memory (RSS): {before:.1f} MiB after the warm-up, {after:.1f} MiB after the run "
          f"({after - before:+.1f} MiB); {len(lines)} log lines")
    for failure in stats.failures[:5]:
        print(f"  lost: {failure}")
    if lost or not alive or after > before * 1.10:
        raise SystemExit("FAILED: " + ", ".join(
            [f"{lost} requests lost"] * bool(lost) + ["the server died"] * (not alive) +
            ["memory grew by more than 10%"] * (after > before * 1.10)))


if __name__ == "__main__":
    main()
