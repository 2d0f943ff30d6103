"""Evaluate a model: one mode per kind of evaluation, each printing a one-line summary and writing --out=FILE.json.

    python evaluate.py chat out/chat/model.bin --data=data/dialogs.jsonl [--n=30] [--out=chat.json]

chat: every question in a fresh conversation through the C engine (chat.py's Engine and Conversation), greedy
unless --temperature says otherwise; the answer is scored against the reference with sacrebleu: `chrf` is the
mean sentence-level chrF, `bleu` the corpus BLEU, `degenerate` the number of answers in which a run of one, two
or three words repeats three times in a row ("это это это", "the model the model the model"). --data is the
dialog file markdown_to_conversations.py writes ({"messages": [...]}: each user turn followed by an assistant
turn is a question, its system message and earlier turns are the conversation's history) or a question set
of {"question": ..., "answer": ...} lines.

Every mode: a progress bar on stderr, --seed for the sampled parts, errors as one line naming the file.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tqdm import tqdm

from arianna_data import write_atomically
from config import add_config_arguments

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
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per answer"})
    threads: int = field(default=0, metadata={"help": "engine threads (0: the engine's choice)"})
    seed: int = field(default=0, metadata={"help": "which questions --n picks, and the sampling seed"})
    out: str = field(default="", metadata={"help": "write the figures and every answer to this JSON file"})


def answer_questions(model: Path, options: ChatEval, questions: list[Question]) -> list[str]:
    """Each question in a fresh conversation (its system prompt and history loaded first) through librun.so."""
    import chat

    if not model.is_file():
        raise EvalError(f"model {model} not found; export one with `python export.py {model} --checkpoint=...`")
    tokenizer = Path(options.tokenizer) if options.tokenizer else chat.find_tokenizer(model)
    if not tokenizer.is_file():
        raise EvalError(f"tokenizer {tokenizer} not found")
    engine = chat.Engine(chat.load_library(chat.library_path()), model, tokenizer, options.threads)
    answers = []
    try:
        for index, question in enumerate(progress(questions, len(questions), "chat")):
            sampling = chat.SamplingConfig(temperature=options.temperature, top_p=options.top_p,
                                           max_new_tokens=options.max_new_tokens,
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
              "degenerate": is_degenerate(a)} for q, a in zip(questions, answers)]
    report = {"mode": "chat", "model": model, **asdict(options),
              "chrf": sum(item["chrf"] for item in items) / len(items),
              "bleu": sacrebleu.corpus_bleu(answers, [references]).score,
              "degenerate": sum(item["degenerate"] for item in items), "n": len(items), "items": items}
    decoding = "greedy" if options.temperature == 0 else f"temperature {options.temperature}, top_p {options.top_p}"
    summary = (f"chat {model} on {options.data}: {len(items)} questions ({decoding}), chrF {report['chrf']:.1f}, "
               f"BLEU {report['bleu']:.1f}, degenerate {report['degenerate']}")
    return report, summary


# ----------------------------------------------------------------------------- command line

MODES: dict[str, tuple[type, Callable[[str, Any], tuple[dict[str, Any], str]], str]] = {
    "chat": (ChatEval, evaluate_chat, "answer every question through the C engine; chrF, BLEU, degenerate answers"),
}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model; one mode per kind of evaluation.")
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for name, (options_class, _, help_text) in MODES.items():
        sub = modes.add_parser(name, help=help_text, description=help_text,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sub.add_argument("model", help="model .bin written by export.py")
        add_config_arguments(sub, options_class)
        if "tokenizer" in options_class.__dataclass_fields__:
            sub.add_argument("-z", dest="tokenizer", default=argparse.SUPPRESS, help="same as --tokenizer")
    args = vars(parser.parse_args(argv))
    options_class, evaluate, _ = MODES[args.pop("mode")]
    model = args.pop("model")
    try:
        report, summary = evaluate(model, options_class(**args))
        write_report(report.get("out"), report)
    except EvalError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    print(summary)


if __name__ == "__main__":
    main()
