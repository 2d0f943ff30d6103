#!/usr/bin/env bash
# From the markdown in doc/ to a model you can chat with, in one command:
#
#     ./train_arianna.sh [VOCAB]      VOCAB: tokenizer size, default 4096; 0 = the Llama 2 tokenizer
#
# prepare -> train_vocab -> tokenizer export -> pretokenize -> train -> dialogs -> chat fine-tune
# -> export -> make run -> a sample answer -> the run report (curves as PNG in out/report/report.html).
# A step whose outputs are newer than its inputs (and that ran with the same command line) is skipped:
# "skip: <step> (up to date)". A failing step names itself.
#
# Environment variables (all optional):
#   ARIANNA_PYTHON              Python to use; set it to skip creating .venv and installing requirements.txt
#   ARIANNA_DOC_DIR             markdown folder (default doc)
#   ARIANNA_OUT_DIR             pretraining output (default out; the chat model goes to $ARIANNA_OUT_DIR/chat)
#   ARIANNA_LLAMA2_TOKENIZER    Meta's tokenizer.model, needed for VOCAB=0 (no default)
#   ARIANNA_DEVICE              auto | cpu | cuda | cuda:N | mps  (pretraining and fine-tuning)
#   ARIANNA_DTYPE               auto | float32 | bfloat16 | float16  (use float32 on mps)
#   ARIANNA_BATCH_SIZE          sequences per step (pretraining and fine-tuning)
#   ARIANNA_MAX_ITERS           pretraining steps (default: sized to the corpus by train_arianna.py)
#   ARIANNA_EXTRA_TRAIN_ARGS    more train_arianna.py flags, e.g. "--dim=64 --n_layers=2 --eval_interval=50"
#   ARIANNA_SFT_ITERS           chat fine-tuning steps (default: 12 epochs over the dialogs)
#   ARIANNA_EXTRA_SFT_ARGS      more finetune.py flags, e.g. "--learning_rate=1e-4 --eval_interval=20"
#   ARIANNA_PRETRAIN_MIX        share of pretraining text in fine-tuning batches (default 0)
#   ARIANNA_MAX_ANSWER_TOKENS   answer cap for the dialogs (default: the model's context minus room for the question)
#   ARIANNA_EXPORT_VERSION      model.bin format: 0 (llama2.c, default), 1 (fp32 'ak42'), 2 (int8 Q8_0)
#   ARIANNA_QUESTION            the sample question (default "Что такое резонанс?")
#   ARIANNA_SAMPLE_TOKENS       most tokens of the sample answer (default 200)
#   ARIANNA_SAMPLE_TEMPERATURE  temperature of the sample answer (default 0.7; 0: greedy)
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

CURRENT_STEP="setup"
trap 'status=$?; echo "step '"'"'$CURRENT_STEP'"'"' failed (exit $status); its output is above" >&2; exit $status' ERR

source steps.sh   # fail, run_step, setup_python

VOCAB="${1:-4096}"
[[ "$VOCAB" =~ ^[0-9]+$ ]] || fail "VOCAB must be a number (e.g. 4096, or 0 for the Llama 2 tokenizer), got '$VOCAB'"
(( $# <= 1 )) || fail "usage: ./train_arianna.sh [VOCAB]; settings go in environment variables (see the top of this script)"

DOC_DIR="${ARIANNA_DOC_DIR:-doc}"
OUT_DIR="${ARIANNA_OUT_DIR:-out}"
CHAT_DIR="$OUT_DIR/chat"
STEPS_DIR="$OUT_DIR/.steps"         # the command line each finished step ran with
EXPORT_VERSION="${ARIANNA_EXPORT_VERSION:-0}"
QUESTION="${ARIANNA_QUESTION:-Что такое резонанс?}"
DIALOGS=data/dialogs.jsonl

if (( VOCAB == 0 )); then
    LLAMA2_TOKENIZER="${ARIANNA_LLAMA2_TOKENIZER:-}"   # no default: the file is Meta's, under its own license
    if [[ ! -f "$LLAMA2_TOKENIZER" ]]; then
        WHY="ARIANNA_LLAMA2_TOKENIZER is not set"
        [[ -z "$LLAMA2_TOKENIZER" ]] || WHY="$LLAMA2_TOKENIZER not found"
        fail "VOCAB=0 needs the Llama 2 tokenizer.model ($WHY), Meta's file (Llama 2 Community License):" \
            "download it from https://huggingface.co/meta-llama/Llama-2-7b-hf and set ARIANNA_LLAMA2_TOKENIZER=PATH"
    fi
    VOCAB_SOURCE=llama2; VOCAB_SIZE=32000
    TOKENIZER_MODEL=data/llama2/tokenizer.model   # a copy, so the exported .bin lands in data/, not beside Meta's file
    SHARDS=data/arianna_data
else
    VOCAB_SOURCE=custom; VOCAB_SIZE=$VOCAB
    TOKENIZER_MODEL="data/tok$VOCAB.model"
    SHARDS="data/tok$VOCAB"
fi
TOKENIZER_BIN="${TOKENIZER_MODEL%.model}.bin"

# ---------------------------------------------------------------------------------------- python

set_runtime_flags   # RUNTIME_FLAGS: device, dtype and batch size for both trainings
setup_python

# ---------------------------------------------------------------------------------------- pipeline

run_step prepare data/arianna_corpus.txt "$DOC_DIR" arianna_data.py -- \
    "$PYTHON" arianna_data.py prepare --doc_dir="$DOC_DIR"

if (( VOCAB == 0 )); then
    run_step tokenizer "$TOKENIZER_BIN" "$LLAMA2_TOKENIZER" tokenizer.py -- \
        bash -c 'mkdir -p "$(dirname "$2")" && cp "$1" "$2" && "$0" tokenizer.py --tokenizer-model="$2"' \
        "$PYTHON" "$LLAMA2_TOKENIZER" "$TOKENIZER_MODEL"
else
    run_step train_vocab "$TOKENIZER_MODEL" data/arianna_corpus.txt arianna_data.py -- \
        "$PYTHON" arianna_data.py train_vocab --vocab_size="$VOCAB"
    run_step tokenizer "$TOKENIZER_BIN" "$TOKENIZER_MODEL" tokenizer.py -- \
        "$PYTHON" tokenizer.py --tokenizer-model="$TOKENIZER_MODEL"
fi

run_step pretokenize "$SHARDS/meta.json" data/arianna_corpus.txt "$TOKENIZER_MODEL" arianna_data.py -- \
    "$PYTHON" arianna_data.py pretokenize --vocab_size="$VOCAB"

TRAIN_COMMAND=("$PYTHON" train_arianna.py --vocab_source="$VOCAB_SOURCE" --vocab_size="$VOCAB_SIZE" --out_dir="$OUT_DIR"
               ${RUNTIME_FLAGS[@]+"${RUNTIME_FLAGS[@]}"})
if [[ -n "${ARIANNA_MAX_ITERS:-}" ]]; then TRAIN_COMMAND+=(--max_iters="$ARIANNA_MAX_ITERS"); fi
read -r -a EXTRA_ARGS <<< "${ARIANNA_EXTRA_TRAIN_ARGS:-}"
TRAIN_COMMAND+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
run_step train "$OUT_DIR/model.bin" "$SHARDS/meta.json" train_arianna.py model.py training.py schedules.py export.py -- \
    "${TRAIN_COMMAND[@]}"

# Fine-tune from the weights with the best validation loss (the ones train_arianna.py exported).
PRETRAINED="$OUT_DIR/best.pt"
[[ -f "$PRETRAINED" ]] || PRETRAINED="$OUT_DIR/ckpt.pt"

# Answers are capped so that question + answer fit the model's context (read from the model.bin header).
CURRENT_STEP="dialogs"
if [[ -n "${ARIANNA_MAX_ANSWER_TOKENS:-}" ]]; then
    MAX_ANSWER_TOKENS="$ARIANNA_MAX_ANSWER_TOKENS"
else
    SEQ_LEN="$("$PYTHON" formats.py "$OUT_DIR/model.bin" seq_len)"
    MAX_ANSWER_TOKENS=$(( SEQ_LEN - (SEQ_LEN / 2 < 64 ? SEQ_LEN / 2 : 64) ))
fi
run_step dialogs "$DIALOGS" "$DOC_DIR" "$TOKENIZER_MODEL" markdown_to_conversations.py -- \
    "$PYTHON" markdown_to_conversations.py --doc_dir="$DOC_DIR" --out="$DIALOGS" --seed=1337 \
    --max_answer_tokens="$MAX_ANSWER_TOKENS" --tokenizer_model="$TOKENIZER_MODEL"

# The chat model must recall its sections word for word and find them for questions in other words: every dialog
# is trained on (none held out), with light dropout (0.1, the pretraining's 0.2 kept it from memorising), for 12
# epochs of the 6 questions per section (8 recall the short sections of doc/, not a manual's longer ones). Three of
# the 6 train the whole answer, the other 3 only its first 32 tokens (which section to start): 2/3 of the tokens, the
# same recall of the training questions, ~3 chrF points fewer new wordings found (2 whole copies were too few for the
# Vim manual's long answers).
SFT_COMMAND=("$PYTHON" finetune.py --method=sft --init_from="$PRETRAINED" --data="$DIALOGS" --out_dir="$CHAT_DIR"
             --lora_r=0 --learning_rate=1e-3 --epochs=12 --dropout=0.1 --val_fraction=0
             --answer_prefix=32 --full_answers=3 --pretrain_mix="${ARIANNA_PRETRAIN_MIX:-0}" --pretrain_data="$SHARDS"
             --export_version="$EXPORT_VERSION" ${RUNTIME_FLAGS[@]+"${RUNTIME_FLAGS[@]}"})
if [[ -n "${ARIANNA_SFT_ITERS:-}" ]]; then SFT_COMMAND+=(--max_iters="$ARIANNA_SFT_ITERS"); fi
read -r -a EXTRA_ARGS <<< "${ARIANNA_EXTRA_SFT_ARGS:-}"
SFT_COMMAND+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
run_step chat_finetune "$CHAT_DIR/ckpt.pt" "$DIALOGS" "$PRETRAINED" "$SHARDS/meta.json" finetune.py tuning.py lora.py training.py model.py -- \
    "${SFT_COMMAND[@]}"

run_step export "$CHAT_DIR/model.bin" "$CHAT_DIR/ckpt.pt" export.py -- \
    "$PYTHON" export.py "$CHAT_DIR/model.bin" --version="$EXPORT_VERSION" --checkpoint="$CHAT_DIR/ckpt.pt"

CURRENT_STEP="make"
command -v make >/dev/null || fail "make not found; install make and a C compiler (gcc or clang)"
echo "==> make: make -j2 run librun.so"
make --no-print-directory -j2 run librun.so   # the two builds side by side

CURRENT_STEP="sample"
echo
echo "Q: $QUESTION"
printf 'A: '
printf '%s\n' "$QUESTION" | ./run "$CHAT_DIR/model.bin" -z "$TOKENIZER_BIN" -m chat -s 1337 \
    -t "${ARIANNA_SAMPLE_TEMPERATURE:-0.7}" -n "${ARIANNA_SAMPLE_TOKENS:-200}"

CURRENT_STEP="report"
echo
echo "==> report: evaluate.py report $OUT_DIR"
"$PYTHON" evaluate.py report "$OUT_DIR"

trap - ERR
cat <<EOF

Done. Chat with your model:

    $PYTHON chat.py $CHAT_DIR/model.bin -z $TOKENIZER_BIN

Generate text from the pretrained model:

    ./run $OUT_DIR/model.bin -z $TOKENIZER_BIN -i "Резонанс"
EOF
