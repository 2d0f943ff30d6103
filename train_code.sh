#!/usr/bin/env bash
# The spec -> code pipeline in one command, on a folder of specs and the code written from them:
#
#     ./train_code.sh SPECS_DIR CODE_DIR [TESTS_DIR]
#
# pairs (build_instructions.py) -> augmentation (augment.py) -> SFT on "Сгенерируй {язык} код из спецификации"
# (finetune.py) -> pass@1 of the SFT model and preferences from running its answers against the tests
# (evaluate.py code) -> KTO or DPO on them (finetune.py) -> pass@1 of the aligned model. Files pair up by stem
# (specs/stack.yaml, code/stack.py, tests/stack.py); TESTS_DIR (default: tests/ beside CODE_DIR, when there is one)
# holds Python statements run after the code. It starts from a pretrained checkpoint (./train_arianna.sh's).
# A step whose outputs are newer than its inputs (and that ran with the same command line) is skipped.
#
# Environment variables (all optional):
#   ARIANNA_PYTHON            Python to use; set it to skip creating .venv and installing requirements.txt
#   ARIANNA_INIT_FROM         pretrained checkpoint (default out/best.pt, else out/ckpt.pt)
#   ARIANNA_CODE_OUT          outputs (default out/code: the data files, sft/, kto/ or dpo/, *_eval.json)
#   ARIANNA_AUGMENT_FACTOR    augmented examples per pair, its original included (default 10)
#   ARIANNA_SEED              augmentation and sampling seed (default 1337)
#   ARIANNA_SFT_ITERS         SFT steps (default: 3 epochs over the augmented pairs)
#   ARIANNA_EXTRA_SFT_ARGS    more finetune.py flags for SFT, e.g. "--learning_rate=1e-4"
#   ARIANNA_ALIGN             kto (default) or dpo
#   ARIANNA_ALIGN_ITERS       alignment steps (default: 2 epochs)
#   ARIANNA_SAMPLES           answers sampled per task, scored by running them (default 8)
#   ARIANNA_TEMPERATURE       their sampling temperature (default 0.8)
#   ARIANNA_TOKENIZER         tokenizer .bin of the models (default: found by evaluate.py beside them or in data/)
#   ARIANNA_ALIGN_LR          alignment learning rate (default 1e-4)
#   ARIANNA_EXTRA_ALIGN_ARGS  more finetune.py flags for alignment, e.g. "--beta=0.2 --desirable_weight=1.5"
#   ARIANNA_DEVICE, ARIANNA_DTYPE, ARIANNA_BATCH_SIZE   as for ./train_arianna.sh
set -Eeuo pipefail
CALLER_DIR="$PWD"   # the folder arguments are relative to; the script runs from the repository like train_arianna.sh
cd "$(dirname "${BASH_SOURCE[0]}")"

CURRENT_STEP="setup"
trap 'status=$?; echo "step '"'"'$CURRENT_STEP'"'"' failed (exit $status); its output is above" >&2; exit $status' ERR
source steps.sh   # fail, run_step, setup_python, set_runtime_flags

(( $# == 2 || $# == 3 )) || fail "usage: ./train_code.sh SPECS_DIR CODE_DIR [TESTS_DIR]; settings go in environment variables (see the top of this script)"
from_caller() { if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "$CALLER_DIR/$1"; fi; }
SPECS_DIR="$(from_caller "$1")"; CODE_DIR="$(from_caller "$2")"
TESTS_DIR="$(from_caller "${3:-$(dirname "$2")/tests}")"
[[ -d "$SPECS_DIR" ]] || fail "SPECS_DIR=$SPECS_DIR is not a folder"
[[ -d "$CODE_DIR" ]] || fail "CODE_DIR=$CODE_DIR is not a folder"
if [[ $# == 3 && ! -d "$TESTS_DIR" ]]; then fail "TESTS_DIR=$TESTS_DIR is not a folder"; fi
[[ -d "$TESTS_DIR" ]] || TESTS_DIR=""

OUT="${ARIANNA_CODE_OUT:-out/code}"
STEPS_DIR="$OUT/.steps"
SEED="${ARIANNA_SEED:-1337}"
ALIGN="${ARIANNA_ALIGN:-kto}"
[[ "$ALIGN" == kto || "$ALIGN" == dpo ]] || fail "ARIANNA_ALIGN must be kto or dpo, got '$ALIGN'"
BASE="${ARIANNA_INIT_FROM:-out/best.pt}"
if [[ -z "${ARIANNA_INIT_FROM:-}" && ! -f "$BASE" ]]; then BASE=out/ckpt.pt; fi
[[ -f "$BASE" ]] || fail "no pretrained checkpoint at $BASE: run ./train_arianna.sh first, or set ARIANNA_INIT_FROM=PATH"

set_runtime_flags
setup_python

# ---------------------------------------------------------------------------------------- data

PAIRS="$OUT/pairs.jsonl"
TASKS="$OUT/tasks.jsonl"
AUGMENTED="$OUT/augmented.jsonl"
PAIRS_COMMAND=("$PYTHON" build_instructions.py --specs="$SPECS_DIR" --code="$CODE_DIR" --out="$PAIRS" --tasks_out="$TASKS")
if [[ -n "$TESTS_DIR" ]]; then PAIRS_COMMAND+=(--tests="$TESTS_DIR"); fi
run_step pairs "$PAIRS" "$SPECS_DIR" "$CODE_DIR" ${TESTS_DIR:+"$TESTS_DIR"} build_instructions.py -- "${PAIRS_COMMAND[@]}"

AUGMENT_COMMAND=("$PYTHON" augment.py --specs="$SPECS_DIR" --code="$CODE_DIR" --out="$AUGMENTED"
                 --factor="${ARIANNA_AUGMENT_FACTOR:-10}" --seed="$SEED")
if [[ -n "$TESTS_DIR" ]]; then AUGMENT_COMMAND+=(--tests="$TESTS_DIR"); fi
run_step augment "$AUGMENTED" "$PAIRS" augment.py -- "${AUGMENT_COMMAND[@]}"

# ---------------------------------------------------------------------------------------- SFT

SFT_DIR="$OUT/sft"
SFT_COMMAND=("$PYTHON" finetune.py --method=sft --init_from="$BASE" --data="$AUGMENTED" --out_dir="$SFT_DIR"
             --lora_r=0 --learning_rate=1e-3 --epochs=3 --truncate=true --seed="$SEED" ${RUNTIME_FLAGS[@]+"${RUNTIME_FLAGS[@]}"})
if [[ -n "${ARIANNA_SFT_ITERS:-}" ]]; then SFT_COMMAND+=(--max_iters="$ARIANNA_SFT_ITERS"); fi
read -r -a EXTRA_ARGS <<< "${ARIANNA_EXTRA_SFT_ARGS:-}"
SFT_COMMAND+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
run_step sft "$SFT_DIR/model.bin" "$AUGMENTED" "$BASE" finetune.py -- "${SFT_COMMAND[@]}"

# ---------------------------------------------------------------------------------------- execution, alignment

# Every task's answers sampled the same way before and after alignment; pass@1 is the share that passes.
EVAL_FLAGS=(--tasks="$TASKS" --chat=true --n="${ARIANNA_SAMPLES:-8}" --k=1 --temperature="${ARIANNA_TEMPERATURE:-0.8}"
            --seed="$SEED")
if [[ -n "${ARIANNA_TOKENIZER:-}" ]]; then EVAL_FLAGS+=(-z "$ARIANNA_TOKENIZER"); fi
PREFERENCES="$OUT/preferences.jsonl"
run_step score_sft "$OUT/sft_eval.json" "$SFT_DIR/model.bin" "$TASKS" evaluate.py sandbox.py -- \
    "$PYTHON" evaluate.py code "$SFT_DIR/model.bin" "${EVAL_FLAGS[@]}" --pairs_out="$PREFERENCES" --out="$OUT/sft_eval.json"

# evaluate.py writes DPO pairs (mixed outcomes only) and labelled answers into one file; each method gets its kind.
ALIGN_DATA="$OUT/$ALIGN.jsonl"
run_step "${ALIGN}_data" "$ALIGN_DATA" "$PREFERENCES" -- "$PYTHON" -c '
import json, sys
source, kind, out = sys.argv[1:]
lines = [line for line in open(source, encoding="utf-8") if ("chosen" if kind == "dpo" else "label") in json.loads(line)]
open(out, "w", encoding="utf-8").writelines(lines)
print(f"{out}: {len(lines)} {kind} lines")' "$PREFERENCES" "$ALIGN" "$ALIGN_DATA"
if [[ ! -s "$ALIGN_DATA" ]]; then
    echo "stop: no task had both passing and failing answers, so there are no $ALIGN pairs; more samples" \
         "(ARIANNA_SAMPLES) or a longer SFT may give some"
    exit 0
fi

ALIGN_DIR="$OUT/$ALIGN"
ALIGN_COMMAND=("$PYTHON" finetune.py --method="$ALIGN" --init_from="$SFT_DIR/ckpt.pt" --data="$ALIGN_DATA"
               --out_dir="$ALIGN_DIR" --lora_r=0 --learning_rate="${ARIANNA_ALIGN_LR:-1e-4}" --epochs=2 --truncate=true
               --seed="$SEED" ${RUNTIME_FLAGS[@]+"${RUNTIME_FLAGS[@]}"})
if [[ -n "${ARIANNA_ALIGN_ITERS:-}" ]]; then ALIGN_COMMAND+=(--max_iters="$ARIANNA_ALIGN_ITERS"); fi
read -r -a EXTRA_ARGS <<< "${ARIANNA_EXTRA_ALIGN_ARGS:-}"
ALIGN_COMMAND+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
run_step align "$ALIGN_DIR/model.bin" "$ALIGN_DATA" "$SFT_DIR/ckpt.pt" finetune.py preference.py -- "${ALIGN_COMMAND[@]}"

run_step "score_$ALIGN" "$OUT/${ALIGN}_eval.json" "$ALIGN_DIR/model.bin" "$TASKS" evaluate.py sandbox.py -- \
    "$PYTHON" evaluate.py code "$ALIGN_DIR/model.bin" "${EVAL_FLAGS[@]}" --out="$OUT/${ALIGN}_eval.json"

CURRENT_STEP="summary"
"$PYTHON" -c '
import json, sys
for stage, path in zip(("SFT", sys.argv[1].upper()), sys.argv[2:]):
    print(f"pass@1 {stage:<4} {json.load(open(path, encoding=\"utf-8\"))[\"pass@1\"]:.3f}  ({path})")' \
    "$ALIGN" "$OUT/sft_eval.json" "$OUT/${ALIGN}_eval.json"
trap - ERR
