"""augment.py: renames that keep Python passing its tests, style changes that keep code parsing (and the same tree),
token-aware renames elsewhere, determinism under --seed, the --factor cap, validation and one-line errors."""
from __future__ import annotations

import ast
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

import augment  # noqa: E402
from build_instructions import find_pairs  # noqa: E402

TASKS = Path(__file__).parent / "fixtures" / "code_tasks"

# Runs each program (code + tests) in a fresh namespace of one interpreter, prints the names of those that fail:
# one process for the whole fixture set instead of one per program.
_BATCH_RUNNER = """
import json, sys, traceback
failed = []
for name, program in json.load(sys.stdin):
    try:
        exec(compile(program, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print(json.dumps(failed))
"""


def failing_programs(programs: dict[str, str]) -> list[str]:
    result = subprocess.run([sys.executable, "-I", "-c", _BATCH_RUNNER], input=json.dumps(list(programs.items())),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def in_process_tests(code: str, tests: str):
    """A fast stand-in for the test runner where only determinism is checked."""
    try:
        exec(compile(code + "\n\n" + tests, "program", "exec"), {"__name__": "__main__"})
    except Exception as exc:  # noqa: BLE001 - any failure of the user's tests is a failed check
        return f"tests failed ({type(exc).__name__})"
    return None


def sources(names=None) -> list[augment.Source]:
    report = find_pairs(TASKS / "specs", TASKS / "code")
    problems: list[str] = []
    found = [augment.load_source(pair, TASKS / "tests", lambda code, tests: None, problems)
             for pair in report.pairs if names is None or pair.code_path.stem in names]
    assert not problems and not report.problems
    return found


def test_fixture_set_is_thirty_python_specs_whose_code_passes_its_tests():
    found = sources()
    assert len(found) >= 30 and all(source.python and source.tests for source in found)
    assert failing_programs({s.pair.code_path.name: s.pair.code + "\n\n" + s.tests for s in found}) == []
    assert {augment.spec_language(s.spec) for s in found} == {"ru", "en"}


def test_renaming_every_spec_identifier_keeps_the_code_passing_its_tests():
    programs, renamed_count = {}, 0
    for source in sources():
        roles = augment.python_identifiers(source.pair.code)["any"] | augment.python_identifiers(source.tests)["any"]
        taken = set(roles)
        mapping = {}
        for name, kind in augment.spec_identifiers(source.spec):
            if name in roles and name not in augment.RESERVED:
                mapping[name] = augment.new_identifier(name, kind, random.Random(name), taken)
                taken.add(mapping[name])
        mapping = {old: new for old, new in mapping.items() if new}
        if not mapping:
            continue
        code, tests = augment.rename_python(source.pair.code, mapping), augment.rename_python(source.tests, mapping)
        assert code is not None and tests is not None, source.pair.code_path
        spec = augment.rename_in_spec(source.spec, mapping)
        assert augment.check_spec(augment.dump_spec(spec)) is None
        for old, new in mapping.items():
            assert new in code and new in augment.dump_spec(spec)
        renamed_count += 1
        programs[source.pair.code_path.name] = code + "\n\n" + tests
    assert renamed_count >= 25
    assert failing_programs(programs) == []


def test_python_rename_touches_identifiers_only_never_strings_comments_or_keywords():
    code = ('def total(values, *, scale=1):\n'
            '    # total of the values\n'
            '    label = "total"\n'
            '    return f"{label}:{total_of(values) * scale}"\n\n'
            'def total_of(values):\n'
            '    return sum(values)\n\n'
            'print(total([1, 2], scale=2), obj.total if False else None)\n')
    renamed = augment.rename_python(code, {"total": "grand_total", "scale": "factor"})
    assert renamed is not None
    assert "def grand_total(values, *, factor=1):" in renamed
    assert "# total of the values" in renamed and 'label = "total"' in renamed
    assert "grand_total([1, 2], factor=2)" in renamed and "obj.grand_total" in renamed
    assert "total_of(values)" in renamed and "def total_of" in renamed


def test_token_aware_rename_in_other_languages_leaves_strings_and_comments():
    pair = next(p for p in find_pairs(REPO_DIR / "tests/fixtures/specs", REPO_DIR / "tests/fixtures/code").pairs
                if p.language == "Zig")
    lexer = augment.lexer_for(pair)
    code = 'pub const User = struct { id: i64 };\n// User is a person\nconst label = "User";\nfn make() User { return .{ .id = 1 }; }\n'
    renamed = augment.rename_tokens(code, lexer, {"User": "Member"})
    assert renamed.count("Member") == 2
    assert '// User is a person' in renamed and '"User"' in renamed
    assert augment.lex_error(renamed, lexer) is None
    assert augment.lex_error("fn f() { return (1;\n", lexer) is not None


def test_every_style_change_keeps_the_code_parsing_and_layout_changes_keep_its_tree():
    for source in sources():
        original = ast.dump(ast.parse(source.pair.code))
        naming, unparse, strip, comment, indent = augment.style_ops(source)
        for op in (unparse, strip, comment, indent):
            changed = op(source.pair.code)
            if changed is not None:
                assert ast.dump(ast.parse(changed)) == original, source.pair.code_path
        renamed = naming(source.pair.code)
        if renamed is not None:
            assert augment.python_syntax_error(renamed) is None
        combined = source.pair.code
        for op in (naming, unparse, strip, comment, indent):
            combined = op(combined) or combined
        assert augment.python_syntax_error(combined) is None
    stack = sources({"stack"})[0]
    assert "# the value is on top of the stack\n    def push" in augment.style_ops(stack)[3](stack.pair.code)
    count = sources({"count_vowels"})[0]
    assert "#" not in augment.strip_comments_python(count.pair.code)
    assert "\n  return" in augment.reindent(count.pair.code, 2, [])


def test_naming_convention_changes_locals_only():
    source = sources({"binary_search"})[0]
    source.pair.code = source.pair.code.replace("middle", "middle_index")
    mapping = augment.convention_mapping(source, source.pair.code)
    assert mapping == {"middle_index": "middleIndex"}   # binary_search, items, target are the spec's or the tests'


def test_comment_removal_in_other_languages_keeps_preprocessor_lines(tmp_path):
    pair = next(p for p in find_pairs(REPO_DIR / "tests/fixtures/specs", REPO_DIR / "tests/fixtures/code").pairs
                if p.language == "Zig")
    pair.code_path = tmp_path / "x.c"
    lexer = augment.lexer_for(pair)
    code = '#include <stdio.h>\n/* block\n   comment */\nint main(void) { // entry\n    return 0;\n}\n'
    assert augment.strip_comments_tokens(code, lexer) == '#include <stdio.h>\nint main(void) {\n    return 0;\n}\n'


def run_augment(tmp_path: Path, name: str, *flags: str, check_tests=in_process_tests) -> list[dict]:
    out = tmp_path / name
    augment.main([f"--specs={TASKS / 'specs'}", f"--code={TASKS / 'code'}", f"--tests={TASKS / 'tests'}",
                  f"--out={out}", *flags], check_tests=check_tests)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_file_and_the_factor_holds(tmp_path, capsys):
    first = run_augment(tmp_path, "a.jsonl", "--factor=6", "--seed=3")
    again = run_augment(tmp_path, "b.jsonl", "--factor=6", "--seed=3")
    other = run_augment(tmp_path, "c.jsonl", "--factor=6", "--seed=4")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first == again and first != other
    pairs = len(sources())
    assert len(first) == 6 * pairs   # every fixture pair has room for five new examples
    per_source: dict[str, int] = {}
    for line in first:
        per_source[line["source"]] = per_source.get(line["source"], 0) + 1
    assert max(per_source.values()) == 6
    methods = {line["method"] for line in first}
    assert methods == {"original", "variation", "backtranslation", "style"}
    printed = capsys.readouterr().out
    for method in ("original", "variation", "backtranslation", "style"):
        count = sum(1 for line in other if line["method"] == method)
        assert f"  {method:<16}{count:>6}" in printed
    assert len(run_augment(tmp_path, "d.jsonl", "--factor=1")) == pairs


def test_every_example_is_a_valid_spec_and_parsing_code(tmp_path):
    prefix = "Сгенерируй Python код из спецификации:\n"
    reverse = "Опиши спецификацию для этого кода:\n"
    for line in run_augment(tmp_path, "all.jsonl", "--factor=8", "--seed=11"):
        if line["method"] == "backtranslation":
            assert line["instruction"].startswith(reverse)
            spec, code = line["output"], line["instruction"][len(reverse):]
        else:
            assert line["instruction"].startswith(prefix)
            spec, code = line["instruction"][len(prefix):], line["output"]
        assert augment.check_spec(spec) is None and augment.python_syntax_error(code) is None


def test_paraphrases_follow_the_spec_language():
    rng = random.Random(0)
    russian = sources({"is_prime"})[0].spec
    english = sources({"gcd"})[0].spec
    for spec, language in ((russian, "ru"), (english, "en")):
        texts = {augment.paraphrase(spec, rng)["behaviors"][0]["then"] for _ in range(30) if augment.paraphrase(spec, rng)}
        prefixes = {t for t in texts for template in augment.PARAPHRASES[language]["then"][1:]
                    if t.startswith(template.split("{x}")[0])}
        assert prefixes, (language, texts)


def test_variants_that_fail_their_tests_are_rejected_and_counted(tmp_path, capsys):
    originals = {source.pair.code for source in sources()}
    lines = run_augment(tmp_path, "x.jsonl", "--factor=4", "--methods=variation",
                        check_tests=lambda code, tests: None if code in originals else "tests failed (renamed)")
    assert {line["method"] for line in lines} == {"original", "variation"}
    assert all(line["output"] in originals for line in lines)   # only the renames change the code
    assert "rejected" in capsys.readouterr().out.split("variation")[1]


def test_bad_input_gets_one_line_errors_naming_the_file(tmp_path, capsys):
    for sub in ("specs", "code", "tests"):
        (tmp_path / sub).mkdir()
    (tmp_path / "specs/good.yaml").write_text((TASKS / "specs/gcd.yaml").read_text())
    (tmp_path / "code/good.py").write_text((TASKS / "code/gcd.py").read_text())
    (tmp_path / "tests/good.py").write_text("assert gcd(2, 4) == 3\n")
    (tmp_path / "specs/bad.yaml").write_text((TASKS / "specs/clamp.yaml").read_text())
    (tmp_path / "code/bad.py").write_text("def clamp(:\n")
    out = tmp_path / "out.jsonl"
    augment.main([f"--specs={tmp_path / 'specs'}", f"--code={tmp_path / 'code'}", f"--tests={tmp_path / 'tests'}",
                  f"--out={out}", "--factor=3"])
    errors = capsys.readouterr().err.splitlines()
    assert any(line.startswith(f"{tmp_path / 'code/bad.py'}: not valid Python (line 1") for line in errors)
    assert any(line.startswith(f"{tmp_path / 'tests/good.py'}: tests failed") for line in errors)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["method"] for line in lines if line["source"] == "bad.py"] == ["original"]
    for flags, message in ((["--factor=0"], "--factor=0 must be at least 1"),
                           ([f"--tests={tmp_path / 'none'}"], "is not a folder"),
                           (["--methods=magic"], "--methods=magic")):
        with pytest.raises(SystemExit) as exit_info:
            augment.main([f"--specs={tmp_path / 'specs'}", f"--code={tmp_path / 'code'}", f"--out={out}", *flags])
        assert message in str(exit_info.value) and "\n" not in str(exit_info.value)
    result = subprocess.run([sys.executable, str(REPO_DIR / "augment.py"), f"--specs={tmp_path / 'nothing'}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0 and "nothing" in result.stderr
    assert yaml.safe_load((tmp_path / "specs/good.yaml").read_text())["name"] == "gcd"


class ScriptedWriter:
    """Stands in for the model: answers describe prompts and code prompts from fixed lists, in turn."""

    def __init__(self, specs: list[str], codes: list[str]):
        self.specs, self.codes, self.prompts = list(specs), list(codes), []

    def answer(self, prompt: str, seed: int):
        self.prompts.append(prompt)
        return (self.specs if prompt.startswith("Опиши") else self.codes).pop(0)


def test_round_trips_keep_valid_model_specs_whose_code_parses_back(tmp_path):
    source = sources({"gcd"})[0]
    good_spec = "name: gcd\nbehaviors:\n  - name: gcd\n    then: the greatest common divisor"
    writer = ScriptedWriter([f"```yaml\n{good_spec}\n```", "not: [yaml", good_spec],
                            ["```python\ndef gcd(a, b):\n    return a\n```", "def gcd(:"])
    candidates = list(augment.round_trips(source, random.Random(0), 3, writer, augment.DEFAULT_TEMPLATE,
                                          augment.DESCRIBE_TEMPLATE))
    assert [c.spec for c in candidates] == [good_spec, "not: [yaml", good_spec]
    assert all(c.code == source.pair.code for c in candidates)   # the real code, never the model's
    problems = [augment.candidate_problem(c, source, lambda code, tests: None) for c in candidates]
    assert problems[0] is None
    assert problems[1].startswith("spec: invalid YAML")
    assert problems[2].startswith("the model's code from its spec does not parse")
    assert writer.prompts[0] == "Опиши спецификацию для этого кода:\n" + source.pair.code.strip()
    assert writer.prompts[1] == "Сгенерируй Python код из спецификации:\n" + good_spec


def test_round_trips_ask_the_model_through_the_c_engine_and_validate_its_answers(tmp_path, capsys):
    """An untrained model through librun.so: every answer is asked for (one describe prompt per attempt), none is a
    valid spec, and each is counted as rejected (what is kept is checked with scripted answers above)."""
    import sentencepiece as spm
    import torch

    import chat
    from export import export_model
    from model import ModelArgs, Transformer
    from tokenizer import Tokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([(TASKS / "code" / "gcd.py").read_text(), (TASKS / "specs" / "gcd.yaml").read_text()] * 20),
        model_prefix=str(tmp_path / "tok"), model_type="bpe", vocab_size=300, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1,
        minloglevel=2)
    tokenizer = Tokenizer(tmp_path / "tok.model")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=tokenizer.n_words,
                                  max_seq_len=160))
    model_bin = export_model(model.eval(), tmp_path / "model.bin", version=1)
    chat.library_path()
    for sub, name in (("specs", "gcd.yaml"), ("code", "gcd.py")):
        (tmp_path / sub).mkdir()
        shutil.copy(TASKS / sub / name, tmp_path / sub)
    out = tmp_path / "out.jsonl"
    augment.main([f"--specs={tmp_path / 'specs'}", f"--code={tmp_path / 'code'}", f"--out={out}", "--factor=2",
                  "--methods=roundtrip", f"--model={model_bin}", f"--tokenizer={tokenizer.export(tmp_path / 'tok.bin')}",
                  "--temperature=1", "--max_new_tokens=24", "--threads=1"])
    assert [json.loads(line)["method"] for line in out.read_text(encoding="utf-8").splitlines()] == ["original"]
    printed = capsys.readouterr().out
    assert "  roundtrip            0   rejected 6 (spec: " in printed, printed
