"""The dialog builder's questions that teach recall (markdown_to_conversations.py): several phrasings per section,
the held-out questions (eval/heldout.jsonl) that measure recall for phrasings it never produces, and the helpers in
eval/ that build the second corpus and the retrieval yardstick."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from markdown_to_conversations import ConversationConfig, build_dialogs, read_markdown_files, split_sections

REPO = Path(__file__).resolve().parent.parent


def test_default_dialogs_ask_each_section_several_ways() -> None:
    dialogs, sections, _ = build_dialogs(ConversationConfig(doc_dir=str(REPO / "doc")))
    by_answer: dict[str, set[str]] = {}
    for dialog in dialogs:
        by_answer.setdefault(dialog["messages"][1]["content"], set()).add(dialog["messages"][0]["content"])
    assert min(len(questions) for questions in by_answer.values()) >= 4     # a heading that is a question: 4
    assert len(dialogs) >= 5 * sections
def test_heldout_questions_match_their_sections_and_are_not_template_phrasings() -> None:
    """eval/heldout.jsonl stays in step with doc/: each reference starts its section; no question is one the dialog
    builder asks."""
    sections = {f"{section.path.relative_to(REPO).as_posix()}#{section.heading}": section.body.strip()
                for path, text in read_markdown_files(REPO / "doc") for section in split_sections(path, text)}
    built, _, _ = build_dialogs(ConversationConfig(doc_dir=str(REPO / "doc"), questions_per_section=100,
                                                   max_answer_tokens=10**6))
    template_questions = {dialog["messages"][0]["content"].casefold() for dialog in built}
    records = [json.loads(line) for line in (REPO / "eval/heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    languages = {"ru": 0, "en": 0}
    for record in records:
        question, reference = (message["content"] for message in record["messages"])
        assert " ".join(sections[record["source"]].split()).startswith(" ".join(reference.split())), record["source"]
        assert question.casefold() not in template_questions, question
        languages["ru" if re.search("[а-яё]", question, re.I) else "en"] += 1
    assert languages["ru"] >= 25 and languages["en"] >= 25


def test_vim_corpus_chapters_become_markdown_sections() -> None:
    sys.path.insert(0, str(REPO / "eval"))
    from vim_corpus import chapter_markdown

    chapter = ("*usr_02.txt*\tFor Vim version 9.0.  Last change: 2021 Jan 01\n\n"
               "\t\t     VIM USER MANUAL - by Bram Moolenaar\n\n\t\t\tThe first steps in Vim\n\n"
               "|02.1|\tRunning Vim for the First Time\n\n     Next chapter: |usr_03.txt|  Moving around\n"
               " Previous chapter: |usr_01.txt|  About the manuals\nTable of contents: |usr_toc.txt|\n\n"
               "==============================================================================\n"
               "*02.1*\tRunning Vim for the First Time\t\t*first-time*\n\nTo start Vim, enter this command:\n>\n"
               "\tgvim file.txt\n\th   left\t\t\t\t\t\t*hjkl*\nSee |:edit| (or |02.2|).  Search for a\\|b, 2*3*4.\n\n"
               "Next chapter: |usr_03.txt|  Moving around\n\n"
               "Copyright: see |manual-copyright|  vim:tw=78:ts=8:noet:ft=help:norl:\n")
    assert chapter_markdown(chapter) == ("# The first steps in Vim\n\n## Running Vim for the First Time\n\n"
                                         "To start Vim, enter this command:\n>\n\tgvim file.txt\n\th   left\n"
                                         "See :edit (or 02.2).  Search for a\\|b, 2*3*4.\n")


def test_vim_heldout_questions_are_not_template_phrasings(tmp_path: Path) -> None:
    """eval/vim_heldout.jsonl: no question is one the dialog builder asks about its section."""
    records = [json.loads(line) for line in (REPO / "eval/vim_heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    chapters: dict[str, str] = {}
    for record in records:
        file, heading = record["source"].split("#", 1)
        chapters[file] = chapters.get(file, "") + f"## {heading}\n\n{record['messages'][1]['content']}\n\n"
    for file, text in chapters.items():
        (tmp_path / file).write_text(text, encoding="utf-8")
    built, sections, _ = build_dialogs(ConversationConfig(doc_dir=str(tmp_path), questions_per_section=100,
                                                          max_answer_tokens=10**6))
    template_questions = {dialog["messages"][0]["content"].casefold() for dialog in built}
    assert len(records) >= 30 and sections == len(records)
    assert not {record["messages"][0]["content"].casefold() for record in records} & template_questions


def test_retrieval_baseline_counts_picks_per_reading(tmp_path: Path) -> None:
    """eval/retrieval_baseline.py: a question worded like a section's text is found by the text, not by the questions;
    a trained question is found every way; a question sharing no word with any section has no pick."""
    sys.path.insert(0, str(REPO / "eval"))
    from retrieval_baseline import RetrievalConfig, retrieval_baseline

    sections = {"Quit with :q! to throw away your changes.": "How do I leave the editor?",
                "To delete a character, move the cursor over it and type x.": "How do I delete a character?",
                "Type i to start Insert mode and enter new text.": "How do I insert text?"}
    dialogs, heldout = tmp_path / "dialogs.jsonl", tmp_path / "heldout.jsonl"
    dialogs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": question},
                                                        {"role": "assistant", "content": text}]}) + "\n"
                               for text, question in sections.items()), encoding="utf-8")
    texts = list(sections)
    asked = [("Which key removes what is under the cursor?", texts[1]), ("How do I insert text?", texts[2]),
             ("Zzz?", texts[0])]
    heldout.write_text("".join(json.dumps({"question": question, "answer": answer}) + "\n"
                               for question, answer in asked), encoding="utf-8")
    results = retrieval_baseline(RetrievalConfig(dialogs=str(dialogs), data=str(heldout)))
    assert {reading: found for reading, (found, _, _) in results.items()} == {
        "questions": 1, "text": 2, "questions and text": 2}
    assert results["text"][1:] == (3, pytest.approx(200 / 3))  # two sections word for word, one no pick
