"""train_code.sh: pairs -> augmentation -> SFT -> answers scored by running them -> alignment data on a few fixture
specs from a tiny base checkpoint; a second run skips every finished step; bad arguments get a one-line error."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO, TINY_VOCAB
from model import ModelArgs, Transformer

TASKS = Path(__file__).parent / "fixtures" / "code_tasks"
STEMS = ("gcd", "clamp", "is_even", "reverse_string")


def run_pipeline(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "train_code.sh"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2", **env})


def test_pairs_augmentation_and_sft_run_then_skip_when_up_to_date(tmp_path: Path, tiny_workspace: Path) -> None:
    for sub in ("specs", "code", "tests"):
        (tmp_path / "tasks" / sub).mkdir(parents=True)
        for stem in STEMS:
            source = next((TASKS / sub).glob(f"{stem}.*"))
            shutil.copy(source, tmp_path / "tasks" / sub / source.name)
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=TINY_VOCAB, max_seq_len=128)
    base = tmp_path / "base.pt"
    torch.save({"model": Transformer(args).state_dict(), "model_args": args.to_dict(), "iter_num": 0,
                "config": {"tokenizer_model": str(tiny_workspace / "data" / f"tok{TINY_VOCAB}.model")}}, base)
    env = {"ARIANNA_PYTHON": sys.executable, "ARIANNA_INIT_FROM": str(base), "ARIANNA_CODE_OUT": str(tmp_path / "out"),
           "ARIANNA_AUGMENT_FACTOR": "3", "ARIANNA_SFT_ITERS": "2", "ARIANNA_DEVICE": "cpu", "ARIANNA_DTYPE": "float32",
           "ARIANNA_BATCH_SIZE": "4", "ARIANNA_SAMPLES": "2", "ARIANNA_ALIGN": "dpo",
           "ARIANNA_TOKENIZER": str(tiny_workspace / "data" / f"tok{TINY_VOCAB}.bin")}
    tasks = tmp_path / "tasks"
    first = run_pipeline(str(tasks / "specs"), str(tasks / "code"), cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    steps = ("pairs", "augment", "sft", "score_sft", "dpo_data")
    for step in steps:
        assert f"==> {step}:" in first.stdout
    assert "wrote 12 examples from 4 pairs (4 with tests)" in first.stdout
    assert "wrote 4 evaluation tasks (4 with tests)" in first.stdout
    assert (tmp_path / "out" / "sft" / "model.bin").is_file()
    # An untrained model's answers all fail: no mixed outcomes, so no DPO pairs, and the run says so.
    assert "stop: no task had both passing and failing answers" in first.stdout
    again = run_pipeline(str(tasks / "specs"), str(tasks / "code"), cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    for step in steps:
        assert f"skip: {step} (up to date)" in again.stdout


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    env = {"ARIANNA_PYTHON": sys.executable, "ARIANNA_INIT_FROM": str(tmp_path / "missing.pt")}
    for args, message in (((), "usage: ./train_code.sh SPECS_DIR CODE_DIR"),
                          ((str(tmp_path / "nope"), str(tmp_path)), "SPECS_DIR="),
                          ((str(tmp_path), str(tmp_path)), "no pretrained checkpoint at")):
        result = run_pipeline(*args, cwd=tmp_path, env=env)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
