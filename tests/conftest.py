"""Shared fixtures: a tiny mixed Russian/English/code corpus taken through prepare, train_vocab and pretokenize."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY_VOCAB = 512

# The engine's instruction-set choice is the tests' to make (test_dispatch.py forces each path): a choice left in
# the caller's shell would send every other build down one path, or stop builds that lack it.
for _name in ("ARIANNA_ISA", "ARIANNA_MAX_ISA"):
    os.environ.pop(_name, None)

_RUSSIAN = [
    "Модель учится на тексте автора и говорит его языком.",
    "Токенизатор режет текст на части, которые модель видит как числа.",
    "Резонанс возникает, когда частота толчков совпадает с собственной частотой системы.",
    "Чем меньше корпус, тем быстрее модель начинает запоминать его наизусть.",
    "Проверочная выборка показывает, учится ли модель обобщать.",
    "Скорость обучения сначала растёт, а потом плавно убывает по косинусу.",
]
_ENGLISH = [
    "The model learns from its author's text and speaks in that voice.",
    "A tokenizer cuts text into pieces that the model sees as numbers.",
    "Resonance happens when the pushes match the natural frequency of a system.",
    "The smaller the corpus, the sooner the model starts to memorise it.",
    "The validation split tells whether the model learns to generalise.",
    "The learning rate first warms up, then decays along a cosine.",
]
_CODE = [
    "```python\ndef train(steps: int) -> float:\n    loss = 0.0\n    for step in range(steps):\n        loss += step * 0.5\n    return loss\n```",
    "```c\nfor (int i = 0; i < n; i++) {\n    out[i] = x[i] * w[i];\n}\n```",
    "```bash\npython train_arianna.py --max_iters=100 --batch_size=8\n```",
]


def tiny_markdown(seed: int, n_docs: int = 24) -> dict[str, str]:
    """n_docs small markdown files mixing Russian, English and code, reproducible from seed."""
    rng = random.Random(seed)
    docs = {}
    for index in range(n_docs):
        lines = [f"# {'Заметка' if index % 2 else 'Note'} {index}", ""]
        for _ in range(12):
            pool = rng.choice((_RUSSIAN, _ENGLISH))
            lines.append(" ".join(rng.sample(pool, 3)) + f" {rng.randint(0, 999)}.")
            lines.append("")
        lines.append(rng.choice(_CODE))
        docs[f"{'ru' if index % 2 else 'en'}/note_{index:02d}.md"] = "\n".join(lines) + "\n"
    return docs


def run_script(script: str, *args: str, cwd: Path, check: bool = True, timeout: float = 300,
               env: dict | None = None, processes: int = 0) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, from cwd (with processes, under torchrun on that
    many processes); on failure show its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes else []
    result = subprocess.run([sys.executable, *launcher, str(REPO / script), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """A folder with doc/ and data/ (corpus, tok512.model/.bin, tok512/ shards), as the quick start leaves it."""
    root = tmp_path_factory.mktemp("workspace")
    for name, text in tiny_markdown(seed=7).items():
        path = root / "doc" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    run_script("arianna_data.py", "prepare", cwd=root)
    run_script("arianna_data.py", "train_vocab", f"--vocab_size={TINY_VOCAB}", cwd=root)
    run_script("tokenizer.py", f"--tokenizer-model=data/tok{TINY_VOCAB}.model", cwd=root)
    run_script("arianna_data.py", "pretokenize", f"--vocab_size={TINY_VOCAB}", cwd=root)
    return root


TINY_MODEL_FLAGS = ("--dim=48", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--max_seq_len=64",
                    "--batch_size=8", f"--vocab_size={TINY_VOCAB}", "--dropout=0", "--device=cpu")


def stop_after(steps: int) -> type:
    """A stand-in for training.StopFlag (monkeypatch it in) that reports a Ctrl-C at the end of step `steps`:
    the loop checks the flag once per step."""

    class StopAfterChecks:
        def __init__(self) -> None:
            self.checks = 0

        @property
        def requested(self) -> bool:
            self.checks += 1
            return self.checks >= steps

        def restore(self) -> None:
            pass

    return StopAfterChecks
