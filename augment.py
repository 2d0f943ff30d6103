"""Augment spec/code pairs into many more instruction examples (the spec-first pipeline's stage 2).

    python augment.py --specs=specs --code=gen --tests=tests --out=data/augmented.jsonl --factor=10 --seed=1337
    python augment.py ... --model=out/code/model.bin --tokenizer=data/tok4096.bin   # + round trips through the model

Pairs come from build_instructions.py (same stems, same checks). Each pair yields its original example plus at
most --factor - 1 new ones, taken in turn from the methods:
  variation        the spec's types, fields and behaviors reordered; identifiers renamed in spec, code and tests
                   (Python through `ast`, other languages on Pygments' tokens: strings, comments and keywords are
                   never touched); optional parts (description, version, given) dropped; given/when/then
                   paraphrased from templates in the spec's language (Russian or English)
  backtranslation  the reverse task, code -> spec ("Опиши спецификацию для этого кода")
  roundtrip        with --model: the model describes the code (through the C engine, librun.so); its spec is kept,
                   paired with the real code, when it is a valid spec and the model's code from it parses back
  style            the same code in another style: local names in the other naming convention, comments removed
                   or added (from the spec's behaviors), re-indented, or re-printed by ast.unparse
Every example is validated: the spec is a YAML mapping with a name, the code parses (Python: ast; others: Pygments
lexes it without errors and its brackets balance), and Python code that changed beyond comments and layout passes
the pair's tests (TESTS/<stem>.py: statements run after the code), run in sandbox.py's sandbox like every program
`evaluate.py code` runs (they are the user's own code re-written, never model output). The same --seed gives the
same file; counts per method are printed.
"""
from __future__ import annotations

import ast
import builtins
import functools
import io
import keyword
import random
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml
from pygments.lexers import get_lexer_for_filename
from pygments.token import Comment, Error, Name, String
from pygments.util import ClassNotFound

from build_instructions import DEFAULT_TEMPLATE, SpecCodePair, check_spec, find_pairs, render_instruction, write_jsonl
from config import parse_config

DESCRIBE_TEMPLATE = "Опиши спецификацию для этого кода:\n{code}"
METHODS = ("variation", "backtranslation", "roundtrip", "style")
REQUIRED_KEYS = {"name", "types", "behaviors"}   # what the code implements; everything else may be dropped
REQUIRED_BEHAVIOR_KEYS = {"name", "when", "then"}
TEST_TIMEOUT_S = 10.0

# Names a rename must not take or touch: keywords, builtins, and methods of builtin types (renaming a field
# `items` would also rename every dict's .items()).
RESERVED = (set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))
            | {name for kind in (dict, list, str, set, tuple, int, float, bytes, object) for name in dir(kind)})

SYNONYMS = {
    "add": "plus", "sum": "total", "total": "sum", "count": "tally", "get": "fetch", "fetch": "get", "create": "make",
    "make": "create", "user": "member", "users": "members", "item": "element", "items": "elements", "value": "entry",
    "values": "entries", "list": "collection", "find": "lookup", "remove": "drop", "is": "check", "to": "into",
    "number": "num", "numbers": "nums", "text": "string", "word": "term", "words": "terms", "reverse": "invert",
    "largest": "biggest", "task": "job", "tasks": "jobs", "account": "wallet", "balance": "funds", "owner": "holder",
    "deposit": "put_in", "withdraw": "take_out", "push": "put", "pop": "take", "size": "length", "register": "enroll",
    "point": "location", "distance": "gap", "stats": "summary", "encode": "pack", "decode": "unpack",
    "queue": "line", "stack": "pile", "counter": "tracker", "increment": "bump", "reset": "clear", "complete": "finish",
    "pending": "open", "title": "label", "done": "finished", "unique": "distinct", "chunks": "pieces",
    "search": "lookup", "parse": "read", "pairs": "entries", "summarize": "describe", "minimum": "lowest",
    "maximum": "highest", "mean": "average", "registry": "directory", "enqueue": "put", "dequeue": "take",
}
PREFIXES = {"behavior": ("do", "compute", "run"), "field": ("the", "current", "stored"), "type": ("Basic", "Simple", "Core")}

PARAPHRASES = {  # {x}: the original text; the first template of each is the identity
    "en": {"given": ("{x}", "given {x}", "assuming {x}", "with {x}", "starting from {x}"),
           "when": ("{x}", "once {x}", "as soon as {x}", "at the moment {x}"),
           "then": ("{x}", "then {x}", "as a result {x}", "expect that {x}", "the outcome: {x}")},
    "ru": {"given": ("{x}", "дано: {x}", "пусть есть {x}", "на входе {x}", "имеется {x}"),
           "when": ("{x}", "когда {x}", "как только {x}", "в момент, когда {x}"),
           "then": ("{x}", "тогда {x}", "в результате {x}", "ожидается, что {x}", "итог: {x}")},
}

TestCheck = Callable[[str, str], Optional[str]]   # (code, tests) -> None when the tests pass, else why not


@dataclass
class AugmentConfig:
    specs: str = field(default="specs", metadata={"help": "folder of YAML specifications"})
    code: str = field(default="gen", metadata={"help": "folder of code, same file stems as the specs"})
    tests: str = field(default="", metadata={"help": "folder of Python tests <stem>.py (statements run after the code)"})
    out: str = field(default="data/augmented.jsonl", metadata={"help": "JSONL written here (originals included)"})
    factor: int = field(default=10, metadata={"help": "at most this many examples per pair, its original included"})
    seed: int = 1337
    methods: str = field(default="variation,backtranslation,roundtrip,style", metadata={"help": "comma list of " + ",".join(METHODS)})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "instruction with {language} and {spec}"})
    describe_template: str = field(default=DESCRIBE_TEMPLATE, metadata={"help": "back-translation instruction with {language} and {code}"})
    model: str = field(default="", metadata={"help": "exported model.bin for round trips; empty: none"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer .bin of --model"})
    temperature: float = 0.8
    max_new_tokens: int = 256
    threads: int = field(default=0, metadata={"help": "engine threads for --model; 0: the engine's default"})

    def __post_init__(self) -> None:
        if self.factor < 1:
            sys.exit(f"error: --factor={self.factor} must be at least 1 (1: the originals only)")
        unknown = set(self.method_list) - set(METHODS)
        if unknown or not self.method_list:
            sys.exit(f"error: --methods={self.methods}: pick from {','.join(METHODS)}")
        if "roundtrip" in self.method_list and self.model and not self.tokenizer:
            sys.exit("error: --model needs --tokenizer=PATH.bin (the tokenizer the model was exported with)")

    @property
    def method_list(self) -> list[str]:
        return [part.strip() for part in self.methods.split(",") if part.strip()]


@dataclass
class Candidate:
    method: str
    spec: str
    code: str
    tests: str = ""
    reverse: bool = False  # an example of code -> spec instead of spec -> code
    problem: str = ""      # set by a method that already knows the candidate is unusable


# ----------------------------------------------------------------------------- checks

def python_syntax_error(code: str) -> Optional[str]:
    try:
        ast.parse(code)
    except SyntaxError as exc:
        return f"not valid Python (line {exc.lineno}: {exc.msg})"
    return None


def lexer_for(pair: SpecCodePair):
    try:
        return get_lexer_for_filename(pair.code_path.name, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


def lex_error(code: str, lexer) -> Optional[str]:
    """Why code does not look well-formed to the lexer (an error token, unbalanced brackets), or None."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    line = 1
    for kind, text in lexer.get_tokens(code):
        if kind in Error:
            return f"unexpected {text!r} at line {line}"
        if not (kind in String or kind in Comment):
            for char in text:
                if char in "([{":
                    stack.append(char)
                elif char in closing and (not stack or stack.pop() != closing[char]):
                    return f"unbalanced {char!r} at line {line}"
        line += text.count("\n")
    return f"unclosed {stack[-1]!r}" if stack else None


def code_error(pair: SpecCodePair, code: str) -> Optional[str]:
    if pair.language == "Python":
        return python_syntax_error(code)
    lexer = lexer_for(pair)
    return lex_error(code, lexer) if lexer is not None else None


@functools.lru_cache(maxsize=None)
def _sandbox():
    import sandbox   # probes the isolation once

    return sandbox.Sandbox()


def run_python_tests(code: str, tests: str) -> Optional[str]:
    """The code followed by its tests in sandbox.py's sandbox, checked as `evaluate.py code` checks an answer."""
    import evaluate
    import sandbox

    limits = sandbox.Limits(wall_seconds=TEST_TIMEOUT_S, cpu_seconds=int(TEST_TIMEOUT_S))
    passed, why = evaluate.execute(evaluate.Task("augment", "", tests), code, _sandbox(), limits)
    return None if passed else f"tests failed ({why})"


def spec_language(spec: dict) -> str:
    """'ru' when a tenth or more of the letters of the spec's prose (description, given/when/then) are Cyrillic:
    Russian specs still name things in Latin letters."""
    prose = [str(spec.get("description", ""))] + [str(behavior.get(key, "")) for behavior in spec.get("behaviors") or []
                                                 if isinstance(behavior, dict) for key in ("given", "when", "then")]
    letters = [char for char in " ".join(prose) if char.isalpha()]
    cyrillic = sum(1 for char in letters if "\u0400" <= char <= "\u04ff")
    return "ru" if letters and cyrillic * 10 >= len(letters) else "en"


def dump_spec(spec: dict) -> str:
    return yaml.safe_dump(spec, allow_unicode=True, sort_keys=False, default_flow_style=False, width=1000).strip()


# ----------------------------------------------------------------------------- renaming

def _identifier_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")


def rename_in_spec(value: object, mapping: dict[str, str], keys: bool = False) -> object:
    """The parsed spec with each identifier replaced where it stands as a whole word in a string, and as a key
    of `types` and `fields` (keys: whether this mapping is one of those); the format's own keys stay."""
    if isinstance(value, dict):
        return {(rename_in_spec(key, mapping) if keys else key):
                rename_in_spec(item, mapping, not keys and key in ("types", "fields")) for key, item in value.items()}
    if isinstance(value, list):
        return [rename_in_spec(item, mapping) for item in value]
    if isinstance(value, str):
        for old, new in mapping.items():
            value = _identifier_pattern(old).sub(new, value)
    return value


class _Renamer(ast.NodeTransformer):
    """The rename done on the tree: what the edited text must parse back to."""

    def __init__(self, mapping: dict[str, str]):
        self.mapping = mapping

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for attribute in ("id", "arg", "attr", "name"):
            value = getattr(node, attribute, None)
            if isinstance(value, str) and value in self.mapping and not isinstance(node, ast.alias):
                setattr(node, attribute, self.mapping[value])
        return super().generic_visit(node)


def _python_name_spans(tree: ast.AST, lines: list[bytes], mapping: dict[str, str]) -> list[tuple[int, int, str]]:
    """(line index, byte column, new name) of every occurrence of a mapped identifier, from the tree's positions."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in mapping:
            spans.append((node.lineno - 1, node.col_offset, node.id))
        elif isinstance(node, ast.arg) and node.arg in mapping:
            spans.append((node.lineno - 1, node.col_offset, node.arg))
        elif isinstance(node, ast.keyword) and node.arg in mapping:
            spans.append((node.lineno - 1, node.col_offset, node.arg))
        elif isinstance(node, ast.Attribute) and node.attr in mapping:
            spans.append((node.end_lineno - 1, node.end_col_offset - len(node.attr.encode()), node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in mapping:
            match = re.compile(rb"(?:async\s+)?(?:def|class)\s+").match(lines[node.lineno - 1], node.col_offset)
            if match:
                spans.append((node.lineno - 1, match.end(), node.name))
    return [(line, column, mapping[old]) for line, column, old in spans
            if lines[line][column:column + len(old.encode())] == old.encode()]


def rename_python(code: str, mapping: dict[str, str]) -> Optional[str]:
    """code with the mapped identifiers renamed at the positions the parser gives; None when the result does not
    parse to the same tree as the rename done on the tree (a name inside an f-string on older Pythons, ...)."""
    tree = ast.parse(code)
    lines = code.encode().splitlines(keepends=True)
    edits = sorted(set(_python_name_spans(tree, lines, mapping)), reverse=True)
    old_by_new = {new: old for old, new in mapping.items()}
    for line, column, new in edits:
        old = old_by_new[new].encode()
        lines[line] = lines[line][:column] + new.encode() + lines[line][column + len(old):]
    renamed = b"".join(lines).decode()
    try:
        same = ast.dump(ast.parse(renamed)) == ast.dump(_Renamer(mapping).visit(ast.parse(code)))
    except SyntaxError:
        return None
    return renamed if same else None


def rename_tokens(code: str, lexer, mapping: dict[str, str]) -> str:
    """code with the mapped identifiers renamed where the lexer sees a name (never in strings, comments, keywords)."""
    return "".join(mapping.get(text, text) if kind in Name else text for kind, text in lexer.get_tokens(code))


def python_identifiers(code: str) -> dict[str, set[str]]:
    """The identifiers of code by role: bound (assigned, parameters, defined), attribute, keyword, imported, any."""
    roles: dict[str, set[str]] = {role: set() for role in ("bound", "attribute", "keyword", "imported", "any")}
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            roles["any"].add(node.id)
            if isinstance(node.ctx, ast.Store):
                roles["bound"].add(node.id)
        elif isinstance(node, ast.arg):
            roles["bound"].add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            roles["bound"].add(node.name)
        elif isinstance(node, ast.Attribute):
            roles["attribute"].add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            roles["keyword"].add(node.arg)
        elif isinstance(node, ast.alias):
            roles["imported"].add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            roles["imported"].update(node.names)  # positions unknown: leave these names alone
    roles["any"] |= roles["bound"] | roles["attribute"] | roles["keyword"]
    return roles


def token_identifiers(code: str, lexer) -> set[str]:
    return {text for kind, text in lexer.get_tokens(code) if kind in Name}


def spec_identifiers(spec: dict) -> list[tuple[str, str]]:
    """(identifier, kind) for the spec's type names, field names and behavior names, in spec order."""
    found = []
    types = spec.get("types")
    if isinstance(types, dict):
        for type_name, body in types.items():
            found.append((str(type_name), "type"))
            fields = body.get("fields") if isinstance(body, dict) else None
            if isinstance(fields, dict):
                found += [(str(name), "field") for name in fields]
    for behavior in spec.get("behaviors") or []:
        if isinstance(behavior, dict) and behavior.get("name"):
            found.append((str(behavior["name"]), "behavior"))
    return [(name, kind) for name, kind in dict.fromkeys(found) if name.isidentifier() and not name.startswith("__")]


def _split_words(name: str) -> list[str]:
    return [word for word in re.split(r"_|(?<=[a-z0-9])(?=[A-Z])", name) if word]


def _join_like(words: list[str], model: str) -> str:
    if "_" in model or model.islower():
        return "_".join(word.lower() for word in words)
    return "".join(word[:1].upper() + word[1:] for word in words)


def new_identifier(name: str, kind: str, rng: random.Random, taken: set[str]) -> Optional[str]:
    """Another plausible name for name in its naming style: a word swapped for a synonym, else a prefix added."""
    words = _split_words(name)
    options = []
    for index, word in enumerate(words):
        synonym = SYNONYMS.get(word.lower())
        if synonym:
            options.append(_join_like(words[:index] + synonym.split("_") + words[index + 1:], name))
    options += [_join_like([prefix] + words, name) for prefix in PREFIXES[kind]]
    options = [option for option in options if option not in taken and option not in RESERVED and option.isidentifier()]
    return rng.choice(options) if options else None


# ----------------------------------------------------------------------------- style

def camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda match: "_" + match.group(1).lower(), name)


def strip_comments_python(code: str) -> str:
    """code without its comments; lines that held only a comment go too."""
    lines = code.splitlines(keepends=True)
    comments = [token.start for token in tokenize.generate_tokens(io.StringIO(code).readline)
                if token.type == tokenize.COMMENT]
    for row, column in reversed(comments):
        kept = lines[row - 1][:column].rstrip()
        lines[row - 1] = kept + "\n" if kept else ""
    return "".join(lines)


def strip_comments_tokens(code: str, lexer) -> str:
    """code without the comments the lexer finds (preprocessor lines stay); lines left empty by that go too."""
    lines, current, touched = [], "", False
    for kind, text in lexer.get_tokens(code):
        comment = kind in Comment and not (kind in Comment.Preproc or kind in Comment.PreprocFile)
        for piece in re.split(r"(\n)", "\n" * text.count("\n") if comment else text):
            if piece == "\n":
                touched |= comment
                if current.strip() or not touched:
                    lines.append((current.rstrip() if touched else current) + "\n")
                current, touched = "", False
            else:
                current += piece
        touched |= comment
    if current.strip() or (current and not touched):
        lines.append(current.rstrip() if touched else current)
    return "".join(lines)


def reindent(code: str, width: int, multiline_spans: list[tuple[int, int]]) -> Optional[str]:
    """Leading indentation rescaled from 4 to width spaces per level; None when the code is not 4-space indented.
    Lines inside multi-line strings (1-based inclusive row spans) are left as they are."""
    inside = {row for first, last in multiline_spans for row in range(first + 1, last + 1)}
    out = []
    for row, line in enumerate(code.splitlines(keepends=True), start=1):
        indent = len(line) - len(line.lstrip(" "))
        if row in inside or not line.strip():
            out.append(line)
            continue
        if indent % 4 or line[indent:indent + 1] == "\t":
            return None
        out.append(" " * (indent // 4 * width) + line[indent:])
    return "".join(out)


def python_multiline_strings(code: str) -> list[tuple[int, int]]:
    return [(token.start[0], token.end[0]) for token in tokenize.generate_tokens(io.StringIO(code).readline)
            if token.type == tokenize.STRING and token.end[0] > token.start[0]]


def token_multiline_strings(code: str, lexer) -> list[tuple[int, int]]:
    spans, row = [], 1
    for kind, text in lexer.get_tokens(code):
        if kind in String and "\n" in text:
            spans.append((row, row + text.count("\n")))
        row += text.count("\n")
    return spans


def add_behavior_comments(code: str, spec: dict) -> Optional[str]:
    """A `# then` comment above each function named after a behavior of the spec (None when there is none)."""
    then_by_name = {str(b["name"]): str(b["then"]) for b in spec.get("behaviors") or []
                    if isinstance(b, dict) and b.get("name") and b.get("then")}
    lines = code.splitlines(keepends=True)
    inserts = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in then_by_name:
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            above = lines[first - 2].strip() if first >= 2 else ""
            if not above.startswith("#"):
                indent = lines[first - 1][:len(lines[first - 1]) - len(lines[first - 1].lstrip())]
                text = " ".join(then_by_name[node.name].split())
                inserts.append((first - 1, f"{indent}# {text}\n"))
    for index, comment in sorted(inserts, reverse=True):
        lines.insert(index, comment)
    return "".join(lines) if inserts else None


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    """One pair with what the methods need: its parsed spec, its tests (Python), its lexer (other languages)."""
    pair: SpecCodePair
    spec: dict
    tests: str = ""
    lexer: object = None
    parses: bool = True  # False: the code itself does not parse, so it is kept as it is and not augmented

    @property
    def python(self) -> bool:
        return self.pair.language == "Python"


def load_source(pair: SpecCodePair, tests_dir: Optional[Path], check_tests: TestCheck, problems: list[str]) -> Source:
    source = Source(pair, yaml.safe_load(pair.spec))
    if not source.python:
        source.lexer = lexer_for(pair)
        source.parses = source.lexer is None or lex_error(pair.code, source.lexer) is None
        return source
    error = python_syntax_error(pair.code)
    if error:
        problems.append(f"{pair.code_path}: {error}; kept as it is, not augmented")
        source.parses = False
        return source
    tests_path = tests_dir / f"{pair.code_path.stem}.py" if tests_dir else None
    if tests_path is None or not tests_path.is_file():
        return source
    try:
        tests = tests_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{tests_path}: not UTF-8 text (byte {exc.start}); {pair.code_path.name} augmented without tests")
        return source
    error = python_syntax_error(tests) or check_tests(pair.code, tests)
    if error:
        problems.append(f"{tests_path}: {error} on {pair.code_path}; {pair.code_path.name} augmented without tests")
    else:
        source.tests = tests
    return source


# ----------------------------------------------------------------------------- variation

def reorder(spec: dict, rng: random.Random) -> Optional[dict]:
    """Types, each type's fields and the behaviors in another order (None when there is nothing to reorder)."""
    def shuffled(mapping: dict) -> dict:
        keys = list(mapping)
        rng.shuffle(keys)
        return {key: mapping[key] for key in keys}

    out = dict(spec)
    if isinstance(out.get("types"), dict):
        out["types"] = {name: ({**body, "fields": shuffled(body["fields"])}
                               if isinstance(body, dict) and isinstance(body.get("fields"), dict) else body)
                        for name, body in shuffled(out["types"]).items()}
    if isinstance(out.get("behaviors"), list):
        out["behaviors"] = rng.sample(out["behaviors"], len(out["behaviors"]))
    return out if dump_spec(out) != dump_spec(spec) else None


def drop_optional(spec: dict, rng: random.Random) -> Optional[dict]:
    """Some of the parts the code does not depend on left out: top-level keys past name/types/behaviors, and
    behaviors' keys past name/when/then (given)."""
    droppable = [(key,) for key in spec if key not in REQUIRED_KEYS]
    for index, behavior in enumerate(spec.get("behaviors") or []):
        if isinstance(behavior, dict):
            droppable += [(index, key) for key in behavior if key not in REQUIRED_BEHAVIOR_KEYS]
    if not droppable:
        return None
    dropped = set(rng.sample(droppable, rng.randint(1, len(droppable))))
    out = {key: value for key, value in spec.items() if (key,) not in dropped}
    if isinstance(out.get("behaviors"), list):
        out["behaviors"] = [{key: value for key, value in behavior.items() if (index, key) not in dropped}
                            if isinstance(behavior, dict) else behavior for index, behavior in enumerate(out["behaviors"])]
    return out


def paraphrase(spec: dict, rng: random.Random) -> Optional[dict]:
    """given/when/then re-worded from the templates of the spec's language."""
    templates = PARAPHRASES[spec_language(spec)]
    behaviors, changed = [], False
    for behavior in spec.get("behaviors") or []:
        if isinstance(behavior, dict):
            behavior = dict(behavior)
            for key, choices in templates.items():
                if isinstance(behavior.get(key), str):
                    template = rng.choice(choices)
                    changed |= template != "{x}"
                    behavior[key] = template.replace("{x}", behavior[key])
        behaviors.append(behavior)
    return {**spec, "behaviors": behaviors} if changed else None


def rename(source: Source, spec: dict, code: str, tests: str,
           rng: random.Random) -> Optional[tuple[dict, str, str]]:
    """One to three of the spec's identifiers renamed consistently in spec, code and tests."""
    if source.python:
        roles = python_identifiers(code)
        if tests:
            test_roles = python_identifiers(tests)
            roles = {role: roles[role] | test_roles[role] for role in roles}
        present, frozen = roles["any"], roles["imported"]
    elif source.lexer is not None:
        present, frozen = token_identifiers(code, source.lexer), set()
    else:
        return None
    candidates = [(name, kind) for name, kind in spec_identifiers(spec)
                  if name in present and name not in frozen and name not in RESERVED]
    if not candidates:
        return None
    taken = present | {name for name, _ in spec_identifiers(spec)}
    mapping: dict[str, str] = {}
    for name, kind in rng.sample(candidates, rng.randint(1, min(3, len(candidates)))):
        new = new_identifier(name, kind, rng, taken)
        if new:
            mapping[name] = new
            taken.add(new)
    if not mapping:
        return None
    if source.python:
        code, tests = rename_python(code, mapping), rename_python(tests, mapping) if tests else ""
        if code is None or tests is None:
            return None
    else:
        code = rename_tokens(code, source.lexer, mapping)
    return rename_in_spec(spec, mapping), code, tests


def variations(source: Source, rng: random.Random, attempts: int) -> Iterator[Candidate]:
    """Specs changed by a random mix of reorder, drop, paraphrase and rename (the code and tests follow renames)."""
    spec_ops = (reorder, drop_optional, paraphrase)
    for _ in range(attempts):
        chosen = [op for op in (*spec_ops, rename) if rng.random() < 0.5] or [rng.choice((*spec_ops, rename))]
        spec, code, tests = source.spec, source.pair.code, source.tests
        for op in chosen:
            if op is rename:
                renamed = rename(source, spec, code, tests, rng)
                if renamed:
                    spec, code, tests = renamed
            else:
                spec = op(spec, rng) or spec
        if spec is not source.spec:
            yield Candidate("variation", dump_spec(spec), code, tests)


# ----------------------------------------------------------------------------- style

def convention_mapping(source: Source, code: str) -> dict[str, str]:
    """Python names bound only in this code (not the spec's, not used by the tests, not attributes or keywords)
    in the other naming convention: snake_case -> camelCase, or back."""
    roles = python_identifiers(code)
    fixed = (roles["attribute"] | roles["keyword"] | roles["imported"] | RESERVED
             | {name for name, _ in spec_identifiers(source.spec)}
             | (python_identifiers(source.tests)["any"] if source.tests else set()))
    mapping = {}
    for name in sorted(roles["bound"] - fixed):
        new = camel_case(name) if "_" in name.strip("_") else snake_case(name)
        if new != name and not name.startswith("_") and new not in roles["any"] and new not in RESERVED:
            mapping[name] = new
    return mapping if len(set(mapping.values())) == len(mapping) else {}


def style_ops(source: Source) -> list[Callable[[str], Optional[str]]]:
    """The style changes that apply to this pair, in the order they are combined; each returns None where it
    does not apply."""
    def naming(code: str) -> Optional[str]:
        mapping = convention_mapping(source, code)
        return rename_python(code, mapping) if mapping else None

    if source.python:
        return [naming,
                lambda code: ast.unparse(ast.parse(code)) + "\n",
                lambda code: strip_comments_python(code),
                lambda code: add_behavior_comments(code, source.spec),
                lambda code: reindent(code, 2, python_multiline_strings(code))]
    if source.lexer is None:
        return []
    return [lambda code: strip_comments_tokens(code, source.lexer),
            lambda code: reindent(code, 2, token_multiline_strings(code, source.lexer))]


def styles(source: Source, rng: random.Random, attempts: int) -> Iterator[Candidate]:
    ops = style_ops(source)
    for _ in range(attempts if ops else 0):
        code = source.pair.code
        for op in [op for op in ops if rng.random() < 0.5] or [rng.choice(ops)]:
            code = op(code) or code
        if code != source.pair.code:
            yield Candidate("style", source.pair.spec, code, source.tests)


# ----------------------------------------------------------------------------- back-translation, round trips

def back_translations(source: Source, rng: random.Random, attempts: int) -> Iterator[Candidate]:
    """code -> spec: the original pair first, then spec variations' pairs."""
    yield Candidate("backtranslation", source.pair.spec, source.pair.code, reverse=True)
    for variant in variations(source, rng, attempts):
        yield Candidate("backtranslation", variant.spec, variant.code, variant.tests, reverse=True)


def fenced_body(text: str) -> str:
    """The inside of the first ``` fence of a model's answer, else the answer itself."""
    match = re.search(r"```[\w+-]*\n(.*?)(?:```|$)", text, re.S)
    return (match.group(1) if match else text).strip()


class ModelWriter:
    """Answers one prompt at a time from an exported model through the C engine (chat.py's binding)."""

    def __init__(self, model: str, tokenizer: str, temperature: float, max_new_tokens: int, threads: int = 0):
        import chat   # ctypes and librun.so: only when a model is given
        for path, flag in ((model, "--model"), (tokenizer, "--tokenizer")):
            if not Path(path).is_file():
                sys.exit(f"error: {flag}={path} is not a file")
        self.chat = chat
        self.engine = chat.Engine(chat.load_library(chat.library_path()), Path(model), Path(tokenizer), threads)
        self.temperature, self.max_new_tokens = temperature, max_new_tokens

    def answer(self, prompt: str, seed: int) -> Optional[str]:
        """The model's answer, or None when the prompt does not fit its context."""
        sampling = self.chat.SamplingConfig(self.temperature, 1.0, self.max_new_tokens, seed)
        conversation = self.chat.Conversation(self.engine, sampling)
        try:
            return conversation.reply(prompt, lambda _: None, lambda _: None, self.chat.Interrupt()).text
        except self.chat.ChatError:
            return None


def round_trips(source: Source, rng: random.Random, attempts: int, writer: ModelWriter, template: str,
                describe_template: str) -> Iterator[Candidate]:
    """The model's spec for the real code, kept (as spec -> real code) when the model's code from it parses."""
    for _ in range(attempts):
        described = writer.answer(describe(describe_template, source.pair), rng.randrange(1, 2 ** 63))
        if described is None:
            return
        spec = fenced_body(described)
        candidate = Candidate("roundtrip", spec, source.pair.code, source.tests)
        if check_spec(spec) is None:
            back = writer.answer(render_instruction(template, source.pair.language, spec), rng.randrange(1, 2 ** 63))
            error = code_error(source.pair, fenced_body(back or ""))
            if back is None or error:
                candidate.problem = f"the model's code from its spec does not parse ({error or 'prompt too long'})"
        yield candidate


def describe(describe_template: str, pair: SpecCodePair) -> str:
    return describe_template.replace("{language}", pair.language).replace("{code}", pair.code.strip())


# ----------------------------------------------------------------------------- selection

@dataclass
class MethodCount:
    kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> how many

    def reject(self, reason: str) -> None:
        reason = reason.split(" (")[0]
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


def candidate_problem(candidate: Candidate, source: Source, check_tests: TestCheck) -> Optional[str]:
    """Why candidate is not a valid example (spec, code, tests), or None."""
    if candidate.problem:
        return candidate.problem
    spec_problem = check_spec(candidate.spec)
    if spec_problem:
        return f"spec: {spec_problem}"
    error = code_error(source.pair, candidate.code)
    if error:
        return f"code: {error}"
    if source.python and candidate.tests:
        unchanged = (candidate.tests == source.tests
                     and ast.dump(ast.parse(candidate.code)) == ast.dump(ast.parse(source.pair.code)))
        if not unchanged:   # comments and layout cannot change what runs
            return check_tests(candidate.code, candidate.tests)
    return None


def augment_source(source: Source, cfg: AugmentConfig, counts: dict[str, MethodCount],
                   check_tests: TestCheck = run_python_tests, writer: Optional[ModelWriter] = None) -> list[dict]:
    """The pair's original example and up to factor - 1 new ones, taken from the methods in turn."""
    pair = source.pair
    template = cfg.template.replace("\\n", "\n")
    describe_template = cfg.describe_template.replace("\\n", "\n")

    def example(candidate: Candidate) -> dict:
        if candidate.reverse:
            instruction, output = describe(describe_template, replace_code(pair, candidate.code)), candidate.spec.strip()
        else:
            instruction, output = render_instruction(template, pair.language, candidate.spec.strip()), candidate.code
        return {"instruction": instruction, "output": output, "method": candidate.method, "source": pair.code_path.name}

    examples = [example(Candidate("original", pair.spec, pair.code))]
    counts["original"].kept += 1
    if not source.parses:
        return examples
    attempts = 3 * cfg.factor

    def rng(method: str) -> random.Random:
        return random.Random(f"{cfg.seed}:{pair.code_path.name}:{method}")

    generators = []
    for method in cfg.method_list:
        if method == "variation":
            generators.append(variations(source, rng(method), attempts))
        elif method == "backtranslation":
            generators.append(back_translations(source, rng(method), attempts))
        elif method == "style":
            generators.append(styles(source, rng(method), attempts))
        elif method == "roundtrip" and writer is not None:
            generators.append(round_trips(source, rng(method), attempts, writer, template, describe_template))
    seen = {(examples[0]["instruction"], examples[0]["output"])}
    while generators and len(examples) < cfg.factor:
        for generator in list(generators):
            candidate = next(generator, None)
            if candidate is None:
                generators.remove(generator)
                continue
            line = example(candidate)
            if (line["instruction"], line["output"]) in seen:
                continue
            seen.add((line["instruction"], line["output"]))
            problem = candidate_problem(candidate, source, check_tests)
            if problem:
                counts[candidate.method].reject(problem)
                continue
            counts[candidate.method].kept += 1
            examples.append(line)
            if len(examples) >= cfg.factor:
                break
    return examples


def replace_code(pair: SpecCodePair, code: str) -> SpecCodePair:
    return SpecCodePair(pair.spec_path, pair.code_path, pair.language, pair.spec, code)


def main(argv: Optional[list[str]] = None, check_tests: TestCheck = run_python_tests) -> None:
    cfg = parse_config(AugmentConfig, argv, description=__doc__.split("\n\n")[0])
    tests_dir = Path(cfg.tests) if cfg.tests else None
    if tests_dir is not None and not tests_dir.is_dir():
        sys.exit(f"error: --tests={tests_dir} is not a folder")
    report = find_pairs(cfg.specs, cfg.code)
    if not report.pairs:
        for problem in report.problems:
            print(problem, file=sys.stderr)
        sys.exit(f"error: no spec/code pair found in {cfg.specs} and {cfg.code}; files pair up by stem "
                 "(user_service.yaml + user_service.py)")
    check_tests = functools.lru_cache(maxsize=None)(check_tests)   # variants often share their code and tests
    sources = [load_source(pair, tests_dir, check_tests, report.problems) for pair in report.pairs]
    for problem in report.problems:
        print(problem, file=sys.stderr)
    writer = None
    if cfg.model and "roundtrip" in cfg.method_list:
        writer = ModelWriter(cfg.model, cfg.tokenizer, cfg.temperature, cfg.max_new_tokens, cfg.threads)
    counts = {method: MethodCount() for method in ("original", *METHODS)}
    examples = [line for source in sources for line in augment_source(source, cfg, counts, check_tests, writer)]
    write_jsonl(cfg.out, examples)
    tested = sum(1 for source in sources if source.tests)
    print(f"wrote {len(examples)} examples from {len(sources)} pairs ({tested} with tests) to {cfg.out} "
          f"(factor {cfg.factor}, seed {cfg.seed})")
    for method, count in counts.items():
        if method in ("original", *cfg.method_list):
            why = ", ".join(f"{reason}: {n}" for reason, n in sorted(count.rejected.items()))
            note = " (no --model)" if method == "roundtrip" and writer is None else ""
            print(f"  {method:<16}{count.kept:>6}{note}" + (f"   rejected {sum(count.rejected.values())} ({why})" if why else ""))


if __name__ == "__main__":
    main()
