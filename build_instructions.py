"""Build instruction-tuning JSONL from specifications and the code generated from them, matched by file stem.

    python build_instructions.py --specs=specs --code=gen --out=data/instructions.jsonl

specs/user_service.vibee (a YAML mapping with name, types, behaviors, ...) and gen/user_service.zig become one line
    {"instruction": "Сгенерируй Zig код из спецификации:\\n<the spec's text>", "output": "<the code>"}
for finetune.py --method=sft. The language comes from the code file's extension (zig -> Zig, py -> Python, ...);
--template changes the instruction ({language} and {spec} are filled in; a literal \\n in the flag means a newline).
Specs that are not valid YAML mappings with a name, specs without code, code without a spec and code in an unknown
language are listed, never dropped silently. PyYAML parses the specs (YAML is too rich for a hand-made parser).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from config import parse_config
from formats import atomic_write

DEFAULT_TEMPLATE = "Сгенерируй {language} код из спецификации:\n{spec}"
LANGUAGES = {
    "zig": "Zig", "py": "Python", "rs": "Rust", "go": "Go", "c": "C", "h": "C", "cc": "C++", "cpp": "C++",
    "hpp": "C++", "js": "JavaScript", "ts": "TypeScript", "java": "Java", "kt": "Kotlin", "swift": "Swift",
    "rb": "Ruby", "cs": "C#", "sh": "Bash", "lua": "Lua", "php": "PHP", "scala": "Scala", "hs": "Haskell",
    "ml": "OCaml", "ex": "Elixir", "jl": "Julia", "sql": "SQL", "nim": "Nim", "d": "D", "dart": "Dart",
}


@dataclass
class BuildConfig:
    specs: str = field(default="specs", metadata={"help": "folder of YAML specifications (any extension, e.g. .vibee)"})
    code: str = field(default="gen", metadata={"help": "folder of generated code, same file stems as the specs"})
    out: str = field(default="data/instructions.jsonl", metadata={"help": "JSONL written here"})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "instruction with {language} and {spec}"})


@dataclass
class BuildReport:
    examples: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line per file that gave no example, with the reason


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _read_text(path: Path, report: BuildReport) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        report.problems.append(f"{path}: not UTF-8 text (byte {exc.start}); skipped")
        return None


def check_spec(text: str) -> Optional[str]:
    """None if text is a YAML mapping with a name, else the reason it is not a usable spec."""
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"invalid YAML{where} ({getattr(exc, 'problem', None) or exc})"
    if not isinstance(spec, dict):
        return f"a YAML {type(spec).__name__}, not a mapping with name/types/behaviors"
    if not spec.get("name"):
        return "no `name:` field"
    return None


def build_examples(specs_dir: str | os.PathLike, code_dir: str | os.PathLike, template: str = DEFAULT_TEMPLATE) -> BuildReport:
    """Pair every spec with every code file of the same stem; everything left unpaired is reported."""
    specs_dir, code_dir = Path(specs_dir), Path(code_dir)
    for folder, flag in ((specs_dir, "--specs"), (code_dir, "--code")):
        if not folder.is_dir():
            sys.exit(f"error: {flag}={folder} is not a folder")
    if "{spec}" not in template:
        sys.exit("error: --template must contain {spec} (and may contain {language})")
    report = BuildReport()
    code_by_stem: dict[str, list[Path]] = {}
    for path in _files(code_dir):
        code_by_stem.setdefault(path.stem, []).append(path)
    spec_stems = set()
    for spec_path in _files(specs_dir):
        spec_stems.add(spec_path.stem)
        spec_text = _read_text(spec_path, report)
        if spec_text is None:
            continue
        problem = check_spec(spec_text)
        if problem:
            report.problems.append(f"{spec_path}: {problem}; skipped")
            continue
        code_paths = code_by_stem.get(spec_path.stem, [])
        if not code_paths:
            report.problems.append(f"{spec_path}: no code file named {spec_path.stem}.* in {code_dir}; skipped")
        for code_path in code_paths:
            language = LANGUAGES.get(code_path.suffix.lstrip(".").lower())
            if language is None:
                report.problems.append(f"{code_path}: unknown language for extension {code_path.suffix or '(none)'}; skipped")
                continue
            code_text = _read_text(code_path, report)
            if code_text is not None:
                instruction = template.replace("{language}", language).replace("{spec}", spec_text.strip())
                report.examples.append({"instruction": instruction, "output": code_text.strip() + "\n"})
    for stem in sorted(set(code_by_stem) - spec_stems):
        for code_path in code_by_stem[stem]:
            report.problems.append(f"{code_path}: no spec named {stem}.* in {specs_dir}; skipped")
    return report


def main(argv: Optional[list[str]] = None) -> None:
    cfg = parse_config(BuildConfig, argv, description=__doc__.split("\n\n")[0])
    report = build_examples(cfg.specs, cfg.code, cfg.template.replace("\\n", "\n"))
    for problem in report.problems:
        print(problem, file=sys.stderr)
    if not report.examples:
        sys.exit(f"error: no spec/code pair found in {cfg.specs} and {cfg.code}; files pair up by stem "
                 "(user_service.vibee + user_service.zig)")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "w", encoding="utf-8") as lines:
        for example in report.examples:
            lines.write(json.dumps(example, ensure_ascii=False) + "\n")
    print(f"wrote {len(report.examples)} examples to {out}" + (f"; {len(report.problems)} files skipped (listed above)"
                                                               if report.problems else ""))


if __name__ == "__main__":
    main()
