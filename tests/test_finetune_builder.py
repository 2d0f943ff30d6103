"""build_instructions.py: spec/code pairs by stem into instruction JSONL, every unpaired or invalid file listed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import build_instructions
from finetune import sft_messages

FIXTURES = Path(__file__).parent / "fixtures"


def test_pairs_by_stem_with_language_from_the_extension() -> None:
    report = build_instructions.build_examples(FIXTURES / "specs", FIXTURES / "code")
    spec_text = (FIXTURES / "specs" / "user_service.vibee").read_text(encoding="utf-8").strip()
    assert [example["instruction"] for example in report.examples] == [
        f"Сгенерируй Python код из спецификации:\n{spec_text}",
        f"Сгенерируй Zig код из спецификации:\n{spec_text}",
    ]
    assert report.examples[1]["output"] == (FIXTURES / "code" / "user_service.zig").read_text(encoding="utf-8")
    problems = "\n".join(report.problems)
    assert "broken.vibee: invalid YAML at line 4" in problems
    assert "listed.vibee: a YAML list, not a mapping" in problems
    assert "orphan_spec.vibee: no code file named orphan_spec.*" in problems
    assert "lonely.rs: no spec named lonely.*" in problems
    assert "mystery.xyz: unknown language for extension .xyz" in problems
    assert len(report.problems) == 5


def test_spec_without_a_name_is_listed(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "code").mkdir()
    (tmp_path / "specs" / "svc.vibee").write_text("types: {}\n")
    (tmp_path / "code" / "svc.zig").write_text("const x = 1;\n")
    report = build_instructions.build_examples(tmp_path / "specs", tmp_path / "code")
    assert not report.examples and report.problems == [f"{tmp_path / 'specs' / 'svc.vibee'}: no `name:` field; skipped"]


def test_cli_writes_jsonl_that_finetune_reads_with_a_custom_template(tmp_path: Path, capsys) -> None:
    out = tmp_path / "instructions.jsonl"
    build_instructions.main([f"--specs={FIXTURES / 'specs'}", f"--code={FIXTURES / 'code'}", f"--out={out}",
                             "--template=Write {language} for:\\n{spec}"])
    printed = capsys.readouterr()
    assert "wrote 2 examples" in printed.out and "5 files skipped" in printed.out
    assert "lonely.rs: no spec named" in printed.err
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[1]["instruction"].startswith("Write Zig for:\nname: user_service")
    assert sft_messages(lines[0])[0] == "instruction"


def test_no_pair_at_all_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "code").mkdir()
    with pytest.raises(SystemExit, match="no spec/code pair found"):
        build_instructions.main([f"--specs={tmp_path / 'specs'}", f"--code={tmp_path / 'code'}"])
    with pytest.raises(SystemExit, match="must contain {spec}"):
        build_instructions.build_examples(tmp_path / "specs", tmp_path / "code", template="no placeholder")
