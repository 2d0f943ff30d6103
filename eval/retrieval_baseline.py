"""What a word-matching retriever finds for held-out questions: the yardstick the chat model's held-out figures are
read against (eval/RESULTS.md). BM25 (rank_bm25's Okapi) ranks the sections of the training dialogs for each
held-out question and picks the top one. A section is read three ways: as the questions the dialogs ask about it,
as its text (the dialogs' answer), and as both. For each, prints how many picks are the reference's section and the
mean chrF of answering with the pick (sacrebleu's, as `evaluate.py chat` scores an answer).

    python eval/retrieval_baseline.py --dialogs=data/dialogs.jsonl --data=eval/heldout.jsonl

A held-out reference must be its section's answer in the dialogs, as the held-out sets here are (the section's
text, capped as the default run caps it), or no pick counts as found.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import sacrebleu
from rank_bm25 import BM25Okapi

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the toolkit's modules, from eval/
from config import parse_config  # noqa: E402
from evaluate import EvalError, read_questions  # noqa: E402

WORD = re.compile(r"\w+")


@dataclass
class RetrievalConfig:
    """Flags of this script (each one is --name=value)."""
    dialogs: str = field(default="data/dialogs.jsonl", metadata={
        "help": "the training dialogs (JSON lines): their answers are the sections, their questions the index"})
    data: str = field(default="eval/heldout.jsonl", metadata={"help": "held-out questions with reference answers"})


def words(text: str) -> list[str]:
    return WORD.findall(text.casefold())


def retrieval_baseline(config: RetrievalConfig) -> dict[str, tuple[int, int, float]]:
    """{reading: (picks that are the reference's section, questions, mean chrF of the picks)}; a question that
    shares no word with any section has no pick (chrF 0)."""
    questions_by_section: dict[str, list[str]] = {}
    for dialog in read_questions(Path(config.dialogs)):
        questions_by_section.setdefault(dialog.reference, []).append(dialog.question)
    sections = list(questions_by_section)
    readings = {"questions": [words(" ".join(questions_by_section[s])) for s in sections],
                "text": [words(s) for s in sections]}
    readings["questions and text"] = [asked + text for asked, text in zip(*readings.values())]
    heldout = read_questions(Path(config.data))
    results = {}
    for reading, documents in readings.items():
        index = BM25Okapi(documents)
        picks = []
        for item in heldout:
            scores = index.get_scores(words(item.question))
            best = int(scores.argmax())
            picks.append(sections[best] if scores[best] > 0 else "")  # no word in common: no pick
        found = sum(pick == item.reference for pick, item in zip(picks, heldout))
        chrf = sum(sacrebleu.sentence_chrf(pick, [item.reference]).score for pick, item in zip(picks, heldout))
        results[reading] = (found, len(heldout), chrf / len(heldout))
    return results


def main(argv: list[str] | None = None) -> None:
    config = parse_config(RetrievalConfig, argv, description="BM25's picks for held-out questions")
    try:
        results = retrieval_baseline(config)
    except EvalError as error:
        sys.exit(f"error: {error}")
    for reading, (found, total, chrf) in results.items():
        print(f"BM25 over each section's {reading}: {found} of {total} found, chrF {chrf:.1f} answering with its pick")


if __name__ == "__main__":
    main()
