"""END-TO-END: ./train_arianna.sh in a copy of the repository, with tiny settings from environment variables.

The slowest test of the suite (about a minute on 2 cores): prepare -> train_vocab -> tokenizer export ->
pretokenize -> train -> dialogs -> chat fine-tune -> export -> make run -> ./run answering a question,
then a second run that skips every step. It reuses the interpreter running pytest (ARIANNA_PYTHON), so
nothing is installed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ["prepare", "train_vocab", "tokenizer", "pretokenize", "train", "dialogs", "chat_finetune", "export"]
TINY_SETTINGS = {
    "ARIANNA_PYTHON": sys.executable,
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
# Built or generated here, not part of the source the script starts from.
NOT_COPIED = shutil.ignore_patterns(".venv", ".git", "data", "out", "run", "rundebug", "librun.so", "__pycache__",
                                    ".pytest_cache", "*.pyc")

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                                reason="the pipeline builds run.c with make and a C compiler")


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The repository's sources in a fresh folder (mtimes kept), so the run neither sees nor touches data/ and out/."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=NOT_COPIED)
    return copy


def run_pipeline(repo: Path, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **TINY_SETTINGS, **env}
    return subprocess.run([str(repo / "train_arianna.sh"), *args], cwd=repo.parent, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def test_train_arianna_sh_end_to_end_then_everything_skipped(repo_copy: Path) -> None:
    first = run_pipeline(repo_copy, "1024", timeout=150)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for step in STEPS:
        assert f"==> {step}:" in first.stdout, step
    for path in ("data/tok1024.model", "data/tok1024.bin", "data/tok1024/meta.json", "data/dialogs.jsonl",
                 "out/model.bin", "out/chat/ckpt.pt", "out/chat/model.bin", "run"):
        assert (repo_copy / path).exists(), path
    answer = re.search(r"^Q: Что такое резонанс\?\nA: (.*?)\nDone\.", first.stdout, re.S | re.M)
    assert answer and answer.group(1).strip(), first.stdout[-2000:]       # ./run printed text
    assert f"chat.py out/chat/model.bin -z data/tok1024.bin" in first.stdout

    second = run_pipeline(repo_copy, "1024", timeout=60)
    assert second.returncode == 0, second.stderr[-3000:]
    for step in STEPS:
        assert f"skip: {step} (up to date)" in second.stdout, step
    assert "==> train" not in second.stdout and "A: " in second.stdout


def test_a_failing_step_names_itself(repo_copy: Path) -> None:
    result = run_pipeline(repo_copy, timeout=60, ARIANNA_DOC_DIR="no_such_folder")
    assert result.returncode != 0
    assert "no_such_folder" in result.stderr
    assert "step 'prepare' failed (exit" in result.stderr


def test_bad_arguments_and_missing_llama2_tokenizer_are_clear_errors(repo_copy: Path) -> None:
    result = run_pipeline(repo_copy, "lots", timeout=30)
    assert result.returncode != 0 and "VOCAB must be a number" in result.stderr
    result = run_pipeline(repo_copy, "0", timeout=30, ARIANNA_LLAMA2_TOKENIZER=str(repo_copy / "missing.model"))
    assert result.returncode != 0 and "ARIANNA_LLAMA2_TOKENIZER" in result.stderr
    assert not (repo_copy / "data").exists()
