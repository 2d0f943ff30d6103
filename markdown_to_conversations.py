"""Turn a folder of markdown into chat dialogs (JSON lines in the messages format TRL reads).

    python markdown_to_conversations.py --doc_dir=doc --out=data/dialogs.jsonl --seed=1337 \\
        --max_answer_tokens=192 --tokenizer_model=data/tok4096.model

Every section (a heading and the text up to the next heading) becomes one or more dialogs:
the user asks about the heading, in the section's language, and the assistant answers with the
section's own text. Each output line looks like

    {"messages": [{"role": "user", "content": "Что такое токенизатор?"},
                  {"role": "assistant", "content": "Токенизатор режет текст на ..."}]}

Headings inside fenced code blocks are code, not structure, and are ignored. The output depends
only on the files and the flags: the same --seed gives a byte-identical file.
"""
from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from config import parse_config
from formats import atomic_write, find_markdown_files, read_markdown

RUSSIAN_TOPIC_TEMPLATES = (
    "Что такое {topic}?",
    "Расскажи про «{topic}».",
    "Объясни, что такое {topic}.",
    "{Topic} — что это?",
    "Что ты знаешь про «{topic}»?",
    "Расскажи подробнее: {topic}.",
    "Коротко про «{topic}».",
    "Что значит «{topic}»?",
    "Коротко: {topic} — это что?",
    "Хочу разобраться: {topic}.",
)
RUSSIAN_CONTEXT_TEMPLATES = (
    "{parent}: расскажи про «{topic}».",
    "Вопрос по теме «{parent}»: что такое {topic}?",
)
RUSSIAN_QUESTION_TEMPLATES = (       # {clause}: the question as an indirect one ("как работает обучение")
    "Объясни, {clause}.",
    "Подскажи, {clause}?",
    "Расскажи, {clause}.",
    "Скажи, {clause}?",
    "Хочу узнать, {clause}.",
    "Не подскажешь, {clause}?",
    "Вопрос: {clause}?",
)
ENGLISH_TOPIC_TEMPLATES = (
    "{what} {topic}?",
    "Tell me about {topic}.",
    "Explain {topic}.",
    "Can you explain {topic}?",
    "What should I know about {topic}?",
    "Give me an overview of {topic}.",
    "{Topic}?",
    "What does {topic} mean?",
    "In short, {what_lower} {topic}?",
    "Help me understand {topic}.",
)
ENGLISH_CONTEXT_TEMPLATES = (
    "{parent}: tell me about {topic}.",
    "A question about {parent}: {what_lower} {topic}?",
)
ENGLISH_QUESTION_TEMPLATES = (
    "Please explain: {clause}?",
    "Tell me, {clause}?",
    "Quick question: {clause}?",
    "Do you know {clause}?",
    "Could you tell me {clause}?",
    "I wonder, {clause}?",
    "Question: {clause}?",
)

# Task questions come from the section's own sentences: "To delete a character, move the cursor over it..." answers
# "How do I delete a character?", in the words a reader asks with, which the heading ("Deleting characters") may lack.
ENGLISH_TASK = re.compile(r"^(?:To|In order to|If you want to|If you need to)\s+(?P<task>[^.,:;!?()\"]{3,70}?)\s*,")
RUSSIAN_TASK = re.compile(
    r"^(?:Чтобы|Если нужно|Если надо|Если хотите|Если вы хотите)\s+(?P<task>[^.,:;!?()«»\"]{3,70}?)\s*,")
ENGLISH_TASK_TEMPLATES = ("How do I {task}?", "How can I {task}?", "What should I do to {task}?")
RUSSIAN_TASK_TEMPLATES = ("Как {task}?", "Как мне {task}?", "Что нужно сделать, чтобы {task}?")
# "To be precise", "To sum up", "To do this": turns of phrase, not tasks; a task ending in a pronoun ("To find it")
# points back at text the question would not have.
NOT_A_TASK_START = {"be", "do", "sum", "say", "put", "recap", "conclude", "summarize", "быть", "итог"}
NOT_A_TASK_END = {"it", "this", "that", "them", "these", "those", "so", "one", "это", "этого", "его", "её", "их", "так"}
# A section that opens by naming its subject twice, "SFT, supervised fine-tuning, trains..." or "Потеря (loss)
# показывает...", can be asked about by either name ("What is supervised fine-tuning?", "Что такое loss?").
OPENING_PARENTHESES = re.compile(r"^(?P<term>[^\s,()—–-][^,()—–]{0,40}?)\s*\((?P<names>[^()]{2,80})\)")
OPENING_ACRONYM = re.compile(r"^(?P<term>[A-Za-z]{2,6}),\s+(?P<names>[^,()]{3,60}),")
ENGLISH_PERSON = ((r"\byou are\b", "I am"), (r"\byou're\b", "I'm"), (r"\byou were\b", "I was"),
                  (r"\byourself\b", "myself"), (r"\byours\b", "mine"), (r"\byour\b", "my"), (r"\byou\b", "I"))

# A heading that starts with one of these is already a question ("Как работает обучение"): Russian needs
# no inversion. In English only "What is X" / "How does X" / "Can I X" shapes are questions; "How training
# works" is a clause, asked about as "Explain how training works".
RUSSIAN_QUESTION_WORDS = ("что", "как", "почему", "зачем", "когда", "где", "какой", "какая", "какое", "какие",
                          "каким", "сколько", "чем", "чего", "можно", "нужно", "нужен", "нужна", "куда", "откуда",
                          "кто", "ли")
ENGLISH_QUESTION = re.compile(
    r"^((what|how|why|when|where|which|who)\s+(is|are|was|were|does|do|did|can|could|should|would|will|happens"
    r"|large|long|much|many|to)\b|(can|could|do|does|is|are|should|will|would)\s)", re.IGNORECASE)
ENGLISH_CLAUSE = re.compile(r"^(what|how|why|when|where|which|who)\s", re.IGNORECASE)
ENGLISH_CLAUSE_TEMPLATES = (
    "Explain {clause}.",
    "Tell me {clause}.",
    "Can you explain {clause}?",
    "I would like to know {clause}.",
    "Could you tell me {clause}?",
    "Do you know {clause}?",
)
TOPIC_PREFIX = re.compile(r"^about\s+(?=\S)", re.IGNORECASE)  # "About the manuals": the topic is "the manuals"
# "Что такое X" / "What is X": the topic X (article kept) feeds the other templates.
DEFINITION_PREFIX = re.compile(r"^(что\s+так(ое|ие)|what\s+(is|are))\s+(?P<topic>.+)$", re.IGNORECASE)

FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}(?P<hashes>#{1,6})(?:[ \t]+(?P<text>.*?))?(?:[ \t]+#+)?[ \t]*$")
SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
CYRILLIC = re.compile(r"[\u0400-\u04FF]")
LATIN = re.compile(r"[A-Za-z]")
INLINE_CODE = re.compile(r"`+([^`]*)`+")


@dataclass
class ConversationConfig:
    """Flags of this script (each one is --name=value)."""
    doc_dir: str = field(default="doc", metadata={"help": "folder of .md/.markdown files, searched recursively"})
    out: str = field(default="data/dialogs.jsonl", metadata={"help": "output JSON lines file"})
    seed: int = field(default=1337, metadata={"help": "seed for the choice of question templates (same seed, same file)"})
    max_answer_tokens: int = field(default=192, metadata={
        "help": "cap on answer length: tokens with --tokenizer_model, else whitespace words"})
    tokenizer_model: str = field(default="", metadata={"help": "SentencePiece .model used to count answer tokens"})
    questions_per_section: int = field(default=6, metadata={
        "help": "how many differently worded questions each section gets"})
    system: str = field(default="", metadata={"help": "optional system prompt put first in every dialog"})

    def __post_init__(self) -> None:
        if self.max_answer_tokens < 1:
            sys.exit(f"error: --max_answer_tokens must be at least 1, got {self.max_answer_tokens}")
        if self.questions_per_section < 1:
            sys.exit(f"error: --questions_per_section must be at least 1, got {self.questions_per_section}")


@dataclass
class Section:
    """A heading and the text under it, up to the next heading of any level."""
    path: Path
    heading: str                    # cleaned heading text
    parent: Optional[str]           # cleaned text of the nearest enclosing heading, for context
    body: str
    language: str = field(default="en")   # "ru" or "en"


def read_markdown_files(doc_dir: Path) -> list[tuple[Path, str]]:
    """All markdown files under doc_dir, sorted, as (path, text without front matter) (formats.read_markdown);
    files that cannot be used are skipped with a note."""
    if not doc_dir.is_dir():
        sys.exit(f"error: doc dir {doc_dir} not found; put your markdown there or pass --doc_dir=PATH")
    paths = find_markdown_files(doc_dir)
    if not paths:
        sys.exit(f"error: no .md or .markdown files under {doc_dir}; put your markdown there or pass --doc_dir=PATH")
    files = []
    for path in paths:
        text, reason = read_markdown(path, lambda message: print(f"warning: {message}", file=sys.stderr))
        if text is None:
            print(f"skip: {path} ({reason})", file=sys.stderr)
        else:
            files.append((path, text))
    return files


def clean_heading(text: str) -> str:
    """Heading text without markdown markup, numbering or trailing punctuation (a final '?' stays)."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", text)          # images -> alt text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)           # links -> link text
    text = re.sub(r"<[^>]+>", "", text)                            # inline HTML
    text = INLINE_CODE.sub(r"\1", text)
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)                # bold
    text = re.sub(r"(?<!\w)([*_])(\S(?:.*?\S)?)\1(?!\w)", r"\2", text)  # italics, not snake_case
    text = re.sub(r"^\s*(\d+(\.\d+)*\.?|[IVX]+\.)\s+", "", text)    # "1.2. Title" -> "Title"
    text = re.sub(r"\s+", " ", text).strip()
    question = text.endswith("?")
    text = text.rstrip(" .,:;!?…—–-")
    return text + "?" if question and text else text


def split_sections(path: Path, text: str) -> list[Section]:
    """Sections of one markdown file; '#' lines inside fenced code blocks are not headings."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []        # (level, cleaned heading) of the enclosing headings
    current: Optional[tuple[str, Optional[str]]] = None
    body: list[str] = []
    open_fence: Optional[str] = None

    def close_section() -> None:
        if current is not None:
            sections.append(Section(path, current[0], current[1], "\n".join(body).strip("\n")))

    for line in text.splitlines():
        fence = FENCE.match(line)
        if open_fence is not None:
            if fence and fence.group("fence")[0] == open_fence[0] and len(fence.group("fence")) >= len(open_fence):
                open_fence = None
            body.append(line)
            continue
        if fence:
            open_fence = fence.group("fence")
            body.append(line)
            continue
        heading = ATX_HEADING.match(line)
        if heading and clean_heading(heading.group("text") or ""):
            close_section()
            level, title = len(heading.group("hashes")), clean_heading(heading.group("text"))
            while stack and stack[-1][0] >= level:
                stack.pop()
            current = (title, stack[-1][1] if stack else None)
            stack.append((level, title))
            body = []
            continue
        body.append(line)
    close_section()
    return sections


def detect_language(section: Section) -> str:
    """'ru' if Cyrillic makes up a real share of the prose letters (code excluded), else 'en'."""
    prose = INLINE_CODE.sub(" ", remove_code_blocks(section.body)) + "\n" + section.heading
    cyrillic, latin = len(CYRILLIC.findall(prose)), len(LATIN.findall(prose))
    return "ru" if cyrillic > 0 and cyrillic >= 0.25 * (cyrillic + latin) else "en"


def remove_code_blocks(text: str) -> str:
    """text without its fenced code blocks (used where only prose matters)."""
    kept, open_fence = [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if open_fence is not None:
            if fence and fence.group("fence")[0] == open_fence[0] and len(fence.group("fence")) >= len(open_fence):
                open_fence = None
        elif fence:
            open_fence = fence.group("fence")
        else:
            kept.append(line)
    return "\n".join(kept)


def lower_first(text: str) -> str:
    """'Токенизатор' -> 'токенизатор', but 'BPE', 'LoRA', 'run.c' and 'Llama 2'-style names stay as written."""
    first_word = text.split(" ", 1)[0]
    letters = first_word.replace("-", "")
    if len(letters) > 1 and letters[0].isupper() and letters[1:].islower() and letters.isalpha():
        return text[0].lower() + text[1:]
    return text


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def is_question(heading: str, language: str) -> bool:
    if heading.endswith("?"):
        return True
    if language == "en":
        return bool(ENGLISH_QUESTION.match(heading))
    return heading.split(" ", 1)[0].lower() in RUSSIAN_QUESTION_WORDS


def english_what(topic: str) -> str:
    """'What is' or 'What are' for a topic, by a plural-looking last word ('flags' yes; 'loss', 'bus' no)."""
    last = re.sub(r"[^A-Za-z]", "", topic.split()[-1]) if topic.split() else ""
    plural = last.endswith("s") and not last.endswith(("ss", "us", "is")) and len(last) > 3 and last.islower()
    return "What are" if plural else "What is"


def prose_sentences(answer: str) -> list[str]:
    """The sentences of an answer's prose (code blocks left out, lines joined)."""
    return SENTENCE_END.split(" ".join(remove_code_blocks(answer).split()))


def task_questions(answer: str, language: str) -> list[str]:
    """Questions that sentences of the answer's prose begin to answer ("To start Vim, type..." -> "How do I start
    Vim?"; "Чтобы начать с нуля, ..." -> "Как начать с нуля?"), each once, in the order they appear."""
    pattern, templates = ((RUSSIAN_TASK, RUSSIAN_TASK_TEMPLATES) if language == "ru"
                          else (ENGLISH_TASK, ENGLISH_TASK_TEMPLATES))
    tasks: list[str] = []
    for number, sentence in enumerate(prose_sentences(answer)):
        match = pattern.match(sentence)
        if not match:
            continue
        words = INLINE_CODE.sub(r"\1", match.group("task")).split()
        if words[0].lower() in NOT_A_TASK_START or words[-1].lower() in NOT_A_TASK_END:
            continue
        task = " ".join(words)
        if language == "en":
            for pattern_to_swap, replacement in ENGLISH_PERSON:
                task = re.sub(pattern_to_swap, replacement, task)
        tasks.append(templates[number % len(templates)].format(task=task))
    return list(dict.fromkeys(tasks))


def spells_acronym(acronym: str, words: str) -> bool:
    """'SFT' and 'supervised fine-tuning', 'LoRA' and 'low-rank adaptation', 'bpb' and 'bits per byte': the words'
    initials are the acronym's capitals (its letters, if it has fewer than two capitals)."""
    initials = "".join(word[0] for word in re.split(r"[\s-]+", words.lower()) if word)
    capitals = "".join(c for c in acronym if c.isupper())
    return len(initials) >= 2 and initials == (capitals if len(capitals) >= 2 else acronym).lower()


def alias_questions(answer: str, heading: str, language: str) -> list[str]:
    """'What is X?' for the other names the answer's first sentence gives its subject (OPENING_PARENTHESES,
    OPENING_ACRONYM), each name the heading does not already contain."""
    first = prose_sentences(answer)[0]
    names: list[str] = []
    match = OPENING_PARENTHESES.match(first)
    if match and len(match.group("term").split()) <= 4:
        names = [match.group("term")] + match.group("names").split(",")
    match = OPENING_ACRONYM.match(first)
    if match and spells_acronym(match.group("term"), match.group("names")):
        names = [match.group("term"), match.group("names")]
    questions = []
    for name in names:
        name = INLINE_CODE.sub(r"\1", name).strip(" «»\"'")
        if len(name) < 2 or name.casefold() in heading.casefold():
            continue
        name = lower_first(name)
        questions.append(f"Что такое {name}?" if language == "ru" else f"{english_what(name)} {name}?")
    return list(dict.fromkeys(questions))


def questions_for(section: Section, count: int, rng: random.Random, from_text: Sequence[str] = ()) -> list[str]:
    """count distinct user questions about a section: the heading itself when it is a question, questions from its
    text (alias_questions, task_questions: at most half of count), then templates (some naming the enclosing
    heading, for headings that only make sense in context)."""
    heading, language = section.heading, section.language
    questions: list[str] = []
    topic: Optional[str] = None
    candidates: list[str] = []
    if is_question(heading, language):
        question = heading if heading.endswith("?") else heading + "?"
        questions.append(upper_first(question))
        definition = DEFINITION_PREFIX.match(heading.rstrip("?"))
        topic = definition.group("topic") if definition else None
        question_templates = RUSSIAN_QUESTION_TEMPLATES if language == "ru" else ENGLISH_QUESTION_TEMPLATES
        candidates = [t.format(clause=lower_first(question.rstrip("?"))) for t in question_templates]
    elif language == "en" and ENGLISH_CLAUSE.match(heading):
        candidates = [t.format(clause=lower_first(heading)) for t in ENGLISH_CLAUSE_TEMPLATES]
    else:
        topic = heading
    if topic:
        topic = lower_first(TOPIC_PREFIX.sub("", topic))
        topic_templates = RUSSIAN_TOPIC_TEMPLATES if language == "ru" else ENGLISH_TOPIC_TEMPLATES
        context_templates = RUSSIAN_CONTEXT_TEMPLATES if language == "ru" else ENGLISH_CONTEXT_TEMPLATES
        what = english_what(topic)
        values = dict(topic=topic, Topic=upper_first(topic), what=what, what_lower=what.lower())
        candidates = [t.format(**values) for t in topic_templates]
        parent = section.parent
        if parent and not is_question(parent, language) and not ENGLISH_CLAUSE.match(parent):
            candidates += [t.format(parent=parent, **values) for t in context_templates]
    text_slots = max(0, min(count // 2, count - len(questions)))
    asked = {q.casefold() for q in questions}
    from_text = [q for q in dict.fromkeys(from_text) if q.casefold() not in asked]
    questions += rng.sample(from_text, min(len(from_text), text_slots))
    seen = {q.casefold() for q in questions}
    candidates = [c for c in dict.fromkeys(candidates) if c.casefold() not in seen]
    questions += rng.sample(candidates, min(len(candidates), max(0, count - len(questions))))
    return questions[:count]


def split_blocks(text: str) -> list[str]:
    """Paragraph-level blocks: runs of lines separated by blank lines; a fenced code block is one block."""
    blocks, current, open_fence = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if open_fence is not None:
            current.append(line)
            if fence and fence.group("fence")[0] == open_fence[0] and len(fence.group("fence")) >= len(open_fence):
                open_fence = None
            continue
        if fence:
            open_fence = fence.group("fence")
            current.append(line)
            continue
        if not line.strip():
            if current:
                blocks.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def cut_block(block: str, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The longest prefix of one block that fits: whole lines of a code block (fence closed again) or a list,
    whole sentences of a paragraph, else whole words."""
    fence = FENCE.match(block)
    if fence:
        lines, closing = block.splitlines(), fence.group("fence")
        taken = lines[:1]
        for line in lines[1:-1]:
            if count_tokens("\n".join(taken + [line, closing])) > max_tokens:
                break
            taken.append(line)
        return "\n".join(taken + [closing]) if len(taken) > 1 else ""
    joiner = "\n" if "\n" in block else " "
    pieces = block.splitlines() if "\n" in block else SENTENCE_END.split(block)
    for candidates, join in ((pieces, joiner), (block.split(), " ")):
        taken = []
        for piece in candidates:
            if count_tokens(join.join(taken + [piece])) > max_tokens:
                break
            taken.append(piece)
        if taken:
            return join.join(taken)
    return ""


def cap_answer(text: str, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The longest prefix of text within max_tokens, cut between paragraphs; a first paragraph that alone is too
    long is cut inside (see cut_block)."""
    if count_tokens(text) <= max_tokens:
        return text
    kept: list[str] = []
    for block in split_blocks(text):
        if count_tokens("\n\n".join(kept + [block])) <= max_tokens:
            kept.append(block)
        else:
            if not kept:
                kept.append(cut_block(block, max_tokens, count_tokens))
            break
    return "\n\n".join(kept).strip()


def token_counter(tokenizer_model: str) -> Callable[[str], int]:
    """Token count with the SentencePiece model when given (what training will see), else whitespace words."""
    if not tokenizer_model:
        return lambda text: len(text.split())
    if not Path(tokenizer_model).is_file():
        sys.exit(f"error: tokenizer {tokenizer_model} not found; train one with "
                 "`python arianna_data.py train_vocab --vocab_size=N` or leave out --tokenizer_model")
    from sentencepiece import SentencePieceProcessor
    processor = SentencePieceProcessor(model_file=tokenizer_model)
    return lambda text: len(processor.encode(text))


def build_dialogs(config: ConversationConfig) -> tuple[list[dict], int, int]:
    """(dialogs, sections used, files read) for the markdown under config.doc_dir."""
    files = read_markdown_files(Path(config.doc_dir))
    count_tokens = token_counter(config.tokenizer_model)
    rng = random.Random(config.seed)
    dialogs, sections_used = [], 0
    for path, text in files:
        for section in split_sections(path, text):
            if not section.body.strip():
                continue
            section.language = detect_language(section)
            answer = cap_answer(section.body.strip(), config.max_answer_tokens, count_tokens)
            if not answer:
                continue
            sections_used += 1
            from_text = (alias_questions(answer, section.heading, section.language)
                         + task_questions(answer, section.language))
            for question in questions_for(section, config.questions_per_section, rng, from_text):
                messages = [{"role": "system", "content": config.system}] if config.system else []
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                dialogs.append({"messages": messages})
    if not dialogs:
        sys.exit(f"error: no sections with text under headings in {config.doc_dir}; "
                 "dialogs come from '# Heading' lines followed by text")
    return dialogs, sections_used, len(files)


def write_jsonl_atomically(path: Path, records: list[dict]) -> None:
    """Write JSON lines to a temporary file beside path, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    config = parse_config(ConversationConfig, argv, description="Turn markdown sections into chat dialogs (JSON lines, messages format)")
    dialogs, sections_used, files_read = build_dialogs(config)
    write_jsonl_atomically(Path(config.out), dialogs)
    print(f"wrote {len(dialogs)} dialogs from {sections_used} sections ({files_read} files) to {config.out}")


if __name__ == "__main__":
    main()
