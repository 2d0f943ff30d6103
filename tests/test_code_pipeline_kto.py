"""KTO on execution labels raises pass@1 over the SFT model, measured on a task family a tiny model learns in
seconds: four one-line Python functions, each specified in YAML, with one right and one wrong implementation.

SFT on both implementations in equal parts (build_instructions.py run on the right code, then on the wrong code)
makes a model that samples right and wrong answers about half and half; evaluate.py code --chat runs its sampled
answers against the tests in the sandbox and writes them with their labels (--pairs_out); finetune.py --method=kto
learns from those labels with the SFT model as the reference; pass@1 is measured again with the same seed and
temperature. Everything goes through the command-line scripts, as train_code.sh calls them.
"""
from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch

from conftest import run_script
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

# name: (the spec's behaviour, right body, wrong body, test)
FUNCTIONS = {
    "double": ("x * 2", "return x * 2", "return x + 2", "assert double(3) == 6"),
    "inc": ("x + 1", "return x + 1", "return x - 1", "assert inc(3) == 4"),
    "neg": ("-x", "return -x", "return x", "assert neg(3) == -3"),
    "square": ("x * x", "return x * x", "return x + x", "assert square(3) == 9"),
}
VOCAB = 384        # SentencePiece's 256 byte pieces, the corpus's characters and a few dozen merges
SAMPLES = 32       # answers per task: 128 labelled answers for KTO, and pass@1 within about +-0.045 (one sd)
SEED = 1
ENV = {"OMP_NUM_THREADS": "1"}
TRAINING = ("--device=cpu", "--dtype=float32", "--lora_r=0", "--val_fraction=0", "--warmup_iters=0",
            "--batch_size=8", f"--seed={SEED}")


def write_tasks(root: Path) -> None:
    """specs/, right/, wrong/ and tests/ folders, one file per function, as train_code.sh takes them."""
    for name, (then, right, wrong, test) in FUNCTIONS.items():
        for folder, text in (("specs", f"name: {name}\nbehaviors:\n  - then: {then}\n"),
                             ("right", f"def {name}(x):\n    {right}\n"), ("wrong", f"def {name}(x):\n    {wrong}\n"),
                             ("tests", test + "\n")):
            path = root / folder / (f"{name}.yaml" if folder == "specs" else f"{name}.py")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


def tiny_model(root: Path, texts: list[str]) -> Path:
    """A SentencePiece tokenizer of the SFT texts (and its .bin) and a random tiny base checkpoint using it."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 10), model_prefix=str(root / "tok"), model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    Tokenizer(root / "tok.model").export(root / "tok.bin")
    torch.manual_seed(SEED)
    args = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=96)
    torch.save({"model": Transformer(args).state_dict(), "model_args": args.to_dict(), "iter_num": 0,
                "config": {"tokenizer_model": str(root / "tok.model")}}, root / "base.pt")
    return root / "base.pt"


def pass_at_1(root: Path, model_dir: str, *flags: str) -> tuple[float, dict]:
    """pass@1 of model_dir/model.bin over the tasks from SAMPLES answers each, sampled at temperature 1 with SEED."""
    report = root / f"{model_dir}_eval.json"
    run_script("evaluate.py", "code", str(root / model_dir / "model.bin"), f"-z={root / 'tok.bin'}",
               f"--tasks={root / 'tasks.jsonl'}", "--chat=true", f"--n={SAMPLES}", "--k=1", "--temperature=1",
               f"--seed={SEED}", "--max_new_tokens=32", f"--out={report}", *flags, cwd=root, env=ENV)
    results = json.loads(report.read_text(encoding="utf-8"))
    return results["pass@1"], {entry["task_id"]: entry["pass@1"] for entry in results["results"]}


def test_kto_on_execution_labels_raises_pass_at_1_over_the_sft_model(tmp_path: Path) -> None:
    write_tasks(tmp_path)
    run_script("build_instructions.py", f"--specs={tmp_path / 'specs'}", f"--code={tmp_path / 'right'}",
               f"--tests={tmp_path / 'tests'}", f"--out={tmp_path / 'right.jsonl'}",
               f"--tasks_out={tmp_path / 'tasks.jsonl'}", cwd=tmp_path, env=ENV)
    run_script("build_instructions.py", f"--specs={tmp_path / 'specs'}", f"--code={tmp_path / 'wrong'}",
               f"--out={tmp_path / 'wrong.jsonl'}", cwd=tmp_path, env=ENV)
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text((tmp_path / "right.jsonl").read_text(encoding="utf-8")
                        + (tmp_path / "wrong.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    examples = [json.loads(line) for line in sft_data.read_text(encoding="utf-8").splitlines()]
    base = tiny_model(tmp_path, [text for example in examples for text in (example["instruction"], example["output"])])
    # 400 steps take the loss to its floor, where only the right/wrong choice is left uncertain (ln 2 over the
    # answer's tokens); at 60 steps every token is still uncertain and no sampled answer passes.
    run_script("finetune.py", "--method=sft", f"--init_from={base}", f"--data={sft_data}",
               f"--out_dir={tmp_path / 'sft'}", "--max_iters=400", "--learning_rate=3e-3", *TRAINING,
               cwd=tmp_path, env=ENV)

    answers = tmp_path / "answers.jsonl"
    before, before_tasks = pass_at_1(tmp_path, "sft", f"--pairs_out={answers}")
    assert 0.25 <= before <= 0.75, f"the SFT model should answer right and wrong about equally: pass@1 {before_tasks}"
    labelled = [line for line in answers.read_text(encoding="utf-8").splitlines() if '"label"' in line]
    assert len(labelled) == SAMPLES * len(FUNCTIONS)
    kto_data = tmp_path / "kto.jsonl"
    kto_data.write_text("\n".join(labelled) + "\n", encoding="utf-8")

    # beta=2: the per-answer loss saturates once an answer has moved a few nats from the reference, so the
    # undesirable answers stop pulling down the tokens they share with the desirable ones (the function's name).
    run_script("finetune.py", "--method=kto", f"--init_from={tmp_path / 'sft' / 'ckpt.pt'}", f"--data={kto_data}",
               f"--out_dir={tmp_path / 'kto'}", "--max_iters=40", "--learning_rate=1e-4", "--beta=2", *TRAINING,
               cwd=tmp_path, env=ENV)
    after, after_tasks = pass_at_1(tmp_path, "kto")
    assert after >= before + 0.2, f"KTO should raise pass@1: {before:.3f} {before_tasks} -> {after:.3f} {after_tasks}"
