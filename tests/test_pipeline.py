"""END-TO-END: ./train_arianna.sh and `make test` in copies of the repository, with tiny settings.

The slowest tests of the suite: prepare -> train_vocab -> tokenizer export -> pretokenize -> train -> dialogs ->
chat fine-tune -> export -> make run -> ./run answering a question; reruns that must redo only what changed;
every ARIANNA_* variable's effect; and the README's two commands in both orders on a fresh copy, each creating
its own .venv as a new user's machine would. Timeouts are generous safety nets, not speed checks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sentencepiece import SentencePieceProcessor

REPO = Path(__file__).resolve().parent.parent
STEPS = ["prepare", "train_vocab", "tokenizer", "pretokenize", "train", "dialogs", "chat_finetune", "export"]
TINY_SETTINGS = {
    "ARIANNA_DEVICE": "cpu",
    "ARIANNA_DTYPE": "float32",
    "ARIANNA_BATCH_SIZE": "8",
    "ARIANNA_MAX_ITERS": "30",
    "ARIANNA_EXTRA_TRAIN_ARGS": "--dim=64 --n_layers=2 --n_heads=4 --max_seq_len=128 --eval_interval=15 --eval_iters=2",
    "ARIANNA_SFT_ITERS": "20",
    "ARIANNA_EXTRA_SFT_ARGS": "--eval_interval=10",
    "ARIANNA_SAMPLE_TEMPERATURE": "1.0",   # a barely trained model answers greedily with whitespace only
    "ARIANNA_SAMPLE_TOKENS": "40",
}
# Two of the shipped documents: enough for a tokenizer, a validation document and dialogs in both languages.
TINY_DOCS = ["ru/01-bystryj-start.md", "en/01-quickstart.md"]
SAFETY_TIMEOUT = 1800
# Built or generated here, not part of the source the script starts from.
NOT_COPIED = shutil.ignore_patterns(".venv", ".git", "data", "out", "run", "rundebug", "librun.so", "__pycache__",
                                    ".pytest_cache", "*.pyc")

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                                reason="the pipeline builds run.c with make and a C compiler")


def fresh_copy(copy: Path) -> Path:
    """The repository's sources in the new folder copy (mtimes kept), as a clean clone has them, plus tiny_doc/ with
    two of the shipped documents."""
    shutil.copytree(REPO, copy, ignore=NOT_COPIED)
    for name in TINY_DOCS:
        (copy / "tiny_doc" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "doc" / name, copy / "tiny_doc" / name)
    return copy


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return fresh_copy(tmp_path / "repo")


def environment(**env: str) -> dict[str, str]:
    """This process's environment without make's own variables (an outer `make test TESTS=...` must not leak into a
    make run inside the test) plus the tiny settings and env."""
    inherited = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return {**inherited, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "ARIANNA_DOC_DIR": "tiny_doc",
            **TINY_SETTINGS, **env}


def run_pipeline(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """./train_arianna.sh from outside the repository (it must cd to itself), reusing the interpreter running pytest."""
    return subprocess.run([str(repo / "train_arianna.sh"), *args], cwd=repo.parent, capture_output=True, text=True, errors="replace",
                          timeout=SAFETY_TIMEOUT, env=environment(ARIANNA_PYTHON=sys.executable, **env))


def ran_and_skipped(result: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = [step for step in STEPS if f"==> {step}:" in result.stdout]
    skipped = [step for step in STEPS if f"skip: {step} (up to date)" in result.stdout]
    assert sorted(ran + skipped) == sorted(STEPS), result.stdout
    return ran, skipped


def command_line(result: subprocess.CompletedProcess, step: str) -> str:
    return re.search(rf"^==> {step}: (.*)$", result.stdout, re.M).group(1)


def last_step(log: Path) -> int:
    """The step of a run's last log.jsonl line (train_arianna.py says "iter", finetune.py "step")."""
    entry = json.loads(log.read_text().splitlines()[-1])
    return entry["iter"] if "iter" in entry else entry["step"]


def sample_answer(result: subprocess.CompletedProcess) -> str:
    answer = re.search(r"^A: (.*?)\n==> report:", result.stdout, re.S | re.M)
    assert answer, result.stdout[-2000:]
    return answer.group(1).strip()


def test_train_arianna_sh_end_to_end_then_redoes_only_what_changed(repo_copy: Path) -> None:
    first = run_pipeline(repo_copy, "512")
    assert ran_and_skipped(first) == (STEPS, [])
    for path in ("data/tok512.model", "data/tok512.bin", "data/tok512/meta.json", "data/dialogs.jsonl",
                 "out/model.bin", "out/chat/ckpt.pt", "out/chat/model.bin", "run", "out/report/report.html"):
        assert (repo_copy / path).exists(), path
    assert re.search(r"^Q: Что такое резонанс\?$", first.stdout, re.M)
    assert sample_answer(first)                                             # ./run printed text
    assert "chat.py out/chat/model.bin -z data/tok512.bin" in first.stdout

    unchanged = run_pipeline(repo_copy, "512")
    assert ran_and_skipped(unchanged) == ([], STEPS)
    assert "A: " in unchanged.stdout

    # A new fine-tuning setting redoes the fine-tune only (finetune.py writes the chat model.bin itself, so the export
    # step finds it up to date).
    more_sft = run_pipeline(repo_copy, "512", ARIANNA_SFT_ITERS="25")
    assert ran_and_skipped(more_sft)[0] == ["chat_finetune"]
    assert (repo_copy / "out/chat/model.bin").stat().st_mtime >= (repo_copy / "out/chat/ckpt.pt").stat().st_mtime
    assert last_step(repo_copy / "out/chat/log.jsonl") == 25

    # An edited document changes the corpus: everything after it is redone (the chat model.bin by the fine-tune
    # again) and the new section reaches the dialogs.
    with open(repo_copy / "tiny_doc" / TINY_DOCS[0], "a", encoding="utf-8") as doc:
        doc.write("\n## Что такое эхо?\n\nЭхо — это отражённый звук, который возвращается к слушателю.\n")
    edited = run_pipeline(repo_copy, "512", ARIANNA_SFT_ITERS="25")
    assert ran_and_skipped(edited)[0] == STEPS[:-1]
    assert (repo_copy / "out/chat/model.bin").stat().st_mtime >= (repo_copy / "out/chat/ckpt.pt").stat().st_mtime
    assert "Эхо — это отражённый звук" in (repo_copy / "data/dialogs.jsonl").read_text(encoding="utf-8")


def test_each_arianna_variable_has_its_effect(repo_copy: Path) -> None:
    """Every variable at the top of train_arianna.sh set away from its default, each effect checked."""
    settings = dict(ARIANNA_OUT_DIR="elsewhere", ARIANNA_BATCH_SIZE="4", ARIANNA_MAX_ITERS="12",
                    ARIANNA_EXTRA_TRAIN_ARGS="--dim=32 --n_layers=1 --n_heads=2 --max_seq_len=96 --eval_interval=6 "
                                             "--eval_iters=1",
                    ARIANNA_SFT_ITERS="7", ARIANNA_EXTRA_SFT_ARGS="--eval_interval=7 --learning_rate=3e-4",
                    ARIANNA_PRETRAIN_MIX="0.5", ARIANNA_MAX_ANSWER_TOKENS="33", ARIANNA_EXPORT_VERSION="1",
                    ARIANNA_QUESTION="What is InnerArianna?", ARIANNA_SAMPLE_TOKENS="5", ARIANNA_SAMPLE_TEMPERATURE="0")
    result = run_pipeline(repo_copy, "400", **settings)
    assert ran_and_skipped(result) == (STEPS, [])
    out = repo_copy / "elsewhere"
    assert not (repo_copy / "out").exists() and not (repo_copy / ".venv").exists()   # ARIANNA_OUT_DIR, ARIANNA_PYTHON
    assert command_line(result, "prepare").startswith(f"{sys.executable} arianna_data.py prepare --doc_dir=tiny_doc")
    train = command_line(result, "train")
    for flag in ("--device=cpu", "--dtype=float32", "--batch_size=4", "--max_iters=12", "--dim=32"):
        assert flag in train.split(), flag
    model_header = struct.unpack("<7i", (out / "model.bin").read_bytes()[:28])
    assert model_header[0] == 32 and model_header[2] == 1 and model_header[6] == 96   # dim, layers, context
    assert last_step(out / "log.jsonl") == 12
    tokenizer = SentencePieceProcessor(model_file=str(repo_copy / "data/tok400.model"))
    answers = [json.loads(line)["messages"][-1]["content"] for line in (repo_copy / "data/dialogs.jsonl").open()]
    assert max(len(tokenizer.encode(answer)) for answer in answers) <= 33        # ARIANNA_MAX_ANSWER_TOKENS
    sft = command_line(result, "chat_finetune").split()
    for flag in ("--pretrain_mix=0.5", "--max_iters=7", "--learning_rate=3e-4", "--export_version=1", "--batch_size=4"):
        assert flag in sft, flag
    assert last_step(out / "chat/log.jsonl") == 7
    assert (out / "chat/model.bin").read_bytes()[:8] == struct.pack("<Ii", 0x616B3432, 1)
    assert re.search(r"^Q: What is InnerArianna\?$", result.stdout, re.M)
    # ARIANNA_SAMPLE_TOKENS (decoded text may re-tokenize a token longer)
    assert len(tokenizer.encode(sample_answer(result))) <= 5 + 1
    again = run_pipeline(repo_copy, "400", **settings)
    assert sample_answer(again) == sample_answer(result)      # ARIANNA_SAMPLE_TEMPERATURE=0: greedy, reproducible


def run_make_test(repo: Path) -> subprocess.CompletedProcess:
    """`make test` limited to one quick test file, so the suite does not recurse into itself."""
    return subprocess.run(["make", "test", "TESTS=tests/test_schedules.py"], cwd=repo, capture_output=True, text=True, errors="replace",
                          timeout=SAFETY_TIMEOUT, env=environment())


def fresh_pipeline(repo: Path) -> subprocess.CompletedProcess:
    """./train_arianna.sh as the README gives it: no ARIANNA_PYTHON, so it sets up .venv itself."""
    env = environment()
    env.pop("ARIANNA_PYTHON", None)
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([str(repo / "train_arianna.sh"), "400"], cwd=repo, capture_output=True, text=True, errors="replace",
                          timeout=SAFETY_TIMEOUT, env=env)


def failed_step(repo: Path, steps: list) -> str:
    """Runs the steps in order in repo; what the first that fails printed, or "" when all succeed."""
    for step in steps:
        result = step(repo)
        if result.returncode != 0:
            return f"{step.__name__}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return ""


def test_readme_commands_work_in_either_order_on_fresh_copies(tmp_path: Path) -> None:
    """Both orders, each on its own fresh copy, side by side: most of their time is pip unpacking and byte-compiling
    the requirements into each copy's .venv, one core each."""
    orders = {"train_then_test": [fresh_pipeline, run_make_test], "test_then_train": [run_make_test, fresh_pipeline]}
    copies = {order: fresh_copy(tmp_path / order) for order in orders}
    with ThreadPoolExecutor(len(orders)) as pool:
        failures = dict(zip(orders, pool.map(failed_step, copies.values(), orders.values())))
    for order, copy in copies.items():
        assert not failures[order], f"{order}, {failures[order]}"
        assert (copy / ".venv/bin/python").exists() and (copy / "out/chat/model.bin").exists(), order


def test_a_failing_step_names_itself(repo_copy: Path) -> None:
    result = run_pipeline(repo_copy, ARIANNA_DOC_DIR="no_such_folder")
    assert result.returncode != 0
    assert "no_such_folder" in result.stderr
    assert "step 'prepare' failed (exit" in result.stderr


def test_bad_arguments_and_missing_llama2_tokenizer_are_clear_errors(repo_copy: Path) -> None:
    result = run_pipeline(repo_copy, "lots")
    assert result.returncode != 0 and "VOCAB must be a number" in result.stderr
    result = run_pipeline(repo_copy, "0", ARIANNA_LLAMA2_TOKENIZER=str(repo_copy / "missing.model"))
    assert result.returncode != 0 and "ARIANNA_LLAMA2_TOKENIZER" in result.stderr
    assert not (repo_copy / "data").exists()

