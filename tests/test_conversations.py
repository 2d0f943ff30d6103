"""markdown_to_conversations.py on fixture markdown written here: languages, headings, caps, determinism, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import markdown_to_conversations as m2c  # noqa: E402

RUSSIAN_DOC = """---
title: заметка
---
# Токенизаторы

Токенизатор режет текст на кусочки, и модель видит их как числа.

## Что такое BPE

BPE сливает самые частые пары символов в новые кусочки словаря.

```bash
# Это комментарий, а не заголовок
python arianna_data.py train_vocab --vocab_size=4096
```

## **Размер** словаря:

Размер словаря — это число токенов. Больше словарь — короче тексты. Но модель становится больше.

## Пустой раздел

## Как работает обучение?

Модель учится предсказывать следующий токен.
"""

ENGLISH_DOC = """# Training

Training lowers the loss step by step.

## 1. The `learning rate`...

The learning rate is the size of each step.

~~~markdown
## Not a heading either
~~~

## How does warmup work

Warmup raises the rate slowly at the start.
"""

LONG_DOC = "# Long section\n\n" + "\n\n".join(
    " ".join(f"Sentence {p}-{s} has several plain words in it." for s in range(6)) for p in range(8)) + "\n"


@pytest.fixture
def doc_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "doc"
    (folder / "ru").mkdir(parents=True)
    (folder / "en").mkdir()
    (folder / "ru" / "tokenizer.md").write_text(RUSSIAN_DOC, encoding="utf-8")
    (folder / "en" / "training.markdown").write_text(ENGLISH_DOC, encoding="utf-8")
    (folder / "notes.txt").write_text("# Not markdown\n\nignored\n", encoding="utf-8")
    return folder


def run_builder(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "markdown_to_conversations.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def read_dialogs(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]


def dialogs_by_answer_start(dialogs: list[list[dict]]) -> dict[str, list[str]]:
    questions: dict[str, list[str]] = {}
    for messages in dialogs:
        questions.setdefault(messages[-1]["content"][:20], []).append(messages[-2]["content"])
    return questions


def test_builds_dialogs_in_the_language_of_each_section(doc_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data" / "dialogs.jsonl"
    result = run_builder(f"--doc_dir={doc_dir}", f"--out={out}", "--questions_per_section=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Russian: Токенизаторы, Что такое BPE, Размер словаря, Как работает обучение (the empty one skipped);
    # English: Training, The learning rate, How does warmup work.
    assert result.stdout.strip() == f"wrote 14 dialogs from 7 sections (2 files) to {out}"
    dialogs = read_dialogs(out)
    assert all([m["role"] for m in messages] == ["user", "assistant"] for messages in dialogs)
    for messages in dialogs:
        question, answer = messages[0]["content"], messages[1]["content"]
        cyrillic_answer = any("\u0400" <= ch <= "\u04ff" for ch in answer)
        cyrillic_question = any("\u0400" <= ch <= "\u04ff" for ch in question)
        assert cyrillic_question == cyrillic_answer, (question, answer)
    questions = dialogs_by_answer_start(dialogs)
    assert "Что такое BPE?" in questions["BPE сливает самые ча"]
    assert "Как работает обучение?" in questions["Модель учится предск"]
    assert "How does warmup work?" in questions["Warmup raises the ra"]
    assert len(set(questions["Размер словаря — это"])) == 2


def test_headings_inside_code_blocks_are_not_sections(doc_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dialogs.jsonl"
    assert run_builder(f"--doc_dir={doc_dir}", f"--out={out}", cwd=tmp_path).returncode == 0
    text = out.read_text(encoding="utf-8")
    assert "комментарий" in text and "Not a heading either" in text      # kept inside the answers...
    questions = [messages[0]["content"] for messages in read_dialogs(out)]
    assert not any("комментарий" in q or "Not a heading" in q for q in questions)  # ...never asked about
    bpe_answer = next(m[1]["content"] for m in read_dialogs(out) if m[1]["content"].startswith("BPE"))
    assert bpe_answer.endswith("```") and "train_vocab" in bpe_answer


def test_heading_cleanup() -> None:
    assert m2c.clean_heading("**Размер** словаря:") == "Размер словаря"
    assert m2c.clean_heading("1. The `learning rate`...") == "The learning rate"
    assert m2c.clean_heading("[BPE](https://example.com) _basics_ ") == "BPE basics"
    assert m2c.clean_heading("Как работает обучение?") == "Как работает обучение?"
    assert m2c.clean_heading("snake_case_name!") == "snake_case_name"
    section = m2c.Section(Path("x.md"), "Что такое BPE", None, "BPE — алгоритм.", "ru")
    assert m2c.questions_for(section, 1, m2c.random.Random(0)) == ["Что такое BPE?"]
    clause = m2c.Section(Path("x.md"), "How training works", None, "It works.", "en")
    asked = m2c.questions_for(clause, 2, m2c.random.Random(0))
    assert all("how training works" in q for q in asked) and len(set(asked)) == 2
    about = m2c.Section(Path("x.md"), "About the manuals", None, "Two manuals.", "en")
    asked = m2c.questions_for(about, 10, m2c.random.Random(0))
    assert "Tell me about the manuals." in asked and not any("about about" in q.lower() for q in asked), asked


def test_sentences_that_start_a_task_become_questions() -> None:
    english = ("Vim is an editor.  To start Vim, type this:\n\n```\nTo ignore code, it is not prose.\n```\n\n"
               "To be precise, it is modal.  To find it, look around.  If you want to see where you are in your file, "
               "press CTRL-G.  To exit, type ZZ.")
    assert m2c.task_questions(english, "en") == ["How can I start Vim?", "How do I see where I am in my file?",
                                                  "How can I exit?"]
    russian = "Чтобы обучить модель на `своих` текстах, положите их в doc/. Если нужно начать с нуля, удалите out/."
    assert m2c.task_questions(russian, "ru") == ["Как обучить модель на своих текстах?", "Как мне начать с нуля?"]
    section = m2c.Section(Path("x.md"), "Выход", None, "Чтобы выйти из редактора, наберите ZZ.", "ru")
    tasks = m2c.task_questions(section.body, "ru")
    for count in (1, 2, 4):     # the task question takes at most half of the questions; templates ask the rest
        asked = m2c.questions_for(section, count, m2c.random.Random(0), tasks)
        assert len(asked) == count and asked.count("Как выйти из редактора?") == (count >= 2)


def test_a_subject_named_twice_is_asked_about_by_each_name() -> None:
    assert m2c.alias_questions("SFT, supervised fine-tuning, trains the model. More text.", "What is SFT", "en") == [
        "What is supervised fine-tuning?"]
    assert m2c.alias_questions("Потеря (loss, «функция потерь») показывает, насколько модель удивлена.",
                               "Что такое потеря", "ru") == ["Что такое loss?", "Что такое функция потерь?"]
    assert m2c.alias_questions("Bits per byte (bpb) is the loss in bits.", "Metrics", "en") == [
        "What is bits per byte?", "What is bpb?"]
    for not_a_definition in ("After warmup, the learning rate falls, slowly.",       # not an acronym and its words
                             "NaN, the model fails, stop.",                          # initials that do not spell it
                             "- Python 3.10 or newer and a C compiler (`gcc` or `clang`).",
                             "Видеокарте не хватает памяти на батч (CUDA out of memory)."):
        assert m2c.alias_questions(not_a_definition, "Heading", "en") == [], not_a_definition
    assert m2c.spells_acronym("LoRA", "low-rank adaptation") and not m2c.spells_acronym("PPO", "policy optimisation")


def test_answer_cap_cuts_at_paragraph_then_sentence_boundaries(tmp_path: Path) -> None:
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "long.md").write_text(LONG_DOC, encoding="utf-8")
    for cap, expected_end in ((100, "Sentence 1-5 has several plain words in it."),
                              (30, "Sentence 0-2 has several plain words in it.")):
        out = tmp_path / f"capped{cap}.jsonl"
        assert run_builder(f"--doc_dir={folder}", f"--out={out}", f"--max_answer_tokens={cap}",
                           "--questions_per_section=1", cwd=tmp_path).returncode == 0
        answer = read_dialogs(out)[0][1]["content"]
        assert len(answer.split()) <= cap
        assert answer.endswith(expected_end), answer[-80:]


def test_answer_cap_counts_tokenizer_tokens(tmp_path: Path) -> None:
    count_words = lambda text: len(text.split())  # noqa: E731
    counted_chars = lambda text: len(text)  # noqa: E731  (a stand-in tokenizer: one token per character)
    paragraph = "Первое предложение. Второе предложение подлиннее. Третье."
    assert m2c.cap_answer(paragraph, 3, count_words) == "Первое предложение."
    assert m2c.cap_answer(paragraph, 50, counted_chars) == "Первое предложение. Второе предложение подлиннее."
    code = "```python\nline_one = 1\nline_two = 2\nline_three = 3\n```"
    assert m2c.cap_answer(code, 40, counted_chars) == "```python\nline_one = 1\nline_two = 2\n```"


def test_same_seed_same_bytes_other_seed_other_questions(doc_dir: Path, tmp_path: Path) -> None:
    outputs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        outputs[name] = tmp_path / f"{name}.jsonl"
        assert run_builder(f"--doc_dir={doc_dir}", f"--out={outputs[name]}", f"--seed={seed}",
                           "--questions_per_section=3", cwd=tmp_path).returncode == 0
    assert outputs["a"].read_bytes() == outputs["b"].read_bytes()
    assert outputs["a"].read_bytes() != outputs["c"].read_bytes()
    answers = lambda path: [m[1]["content"] for m in read_dialogs(path)]  # noqa: E731
    assert answers(outputs["a"]) == answers(outputs["c"])   # only the wording of questions differs


def test_system_prompt_goes_first(doc_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "system.jsonl"
    assert run_builder(f"--doc_dir={doc_dir}", f"--out={out}", "--system=Отвечай коротко.", cwd=tmp_path).returncode == 0
    assert all(m[0] == {"role": "system", "content": "Отвечай коротко."} for m in read_dialogs(out))


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "no .md or .markdown files under"),
    (lambda d: (d.mkdir(), (d / "a.md").write_text("just text, no headings\n")), "no sections with text"),
])
def test_missing_or_empty_doc_dir_is_one_clear_line(tmp_path: Path, setup, message: str) -> None:
    folder = tmp_path / "nothing"
    setup(folder)
    result = run_builder(f"--doc_dir={folder}", f"--out={tmp_path / 'x.jsonl'}", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and str(folder) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_shipped_doc_builds_bilingual_dialogs(tmp_path: Path) -> None:
    out = tmp_path / "doc.jsonl"
    result = run_builder(f"--doc_dir={REPO / 'doc'}", f"--out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    questions = [m[0]["content"] for m in read_dialogs(out)]
    assert "Что такое резонанс?" in questions and "What is a checkpoint?" in questions
    assert len(questions) > 200


def test_reads_markdown_as_prepare_does(tmp_path: Path) -> None:
    """The one markdown reader (formats.read_markdown): TOML front matter, a BOM, CRLF, control characters removed
    with a warning, a FIFO skipped at once rather than waited on."""
    folder = tmp_path / "doc"
    folder.mkdir()
    (folder / "toml.md").write_text('+++\ntitle = "x"\n+++\n# TOML heading\n\nBody one.\n', encoding="utf-8")
    (folder / "bom.md").write_bytes("\ufeff# BOM heading\r\n\r\nBody\x00 two.\x1b[2J\r\n".encode("utf-8"))
    os.mkfifo(folder / "fifo.md")
    out = tmp_path / "dialogs.jsonl"
    result = run_builder(f"--doc_dir={folder}", f"--out={out}", "--questions_per_section=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    dialogs = read_dialogs(out)
    assert [m[-1]["content"] for m in dialogs] == ["Body two.[2J", "Body one."]
    assert "BOM heading" in dialogs[0][0]["content"] and "TOML heading" in dialogs[1][0]["content"]
    assert result.stderr.splitlines() == [
        f"warning: {folder / 'bom.md'}: removed 2 control characters (the first U+0000 at byte 21); they are not text",
        f"skip: {folder / 'fifo.md'} (cannot read it (not a regular file but a FIFO, socket or device); "
        "check that it exists and is readable)"]
