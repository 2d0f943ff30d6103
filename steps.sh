# Shell helpers sourced by train_arianna.sh and train_code.sh (bash; they set CURRENT_STEP for their ERR trap).
#
#   fail MESSAGE...                       one-line error, exit 2
#   run_step NAME OUTPUT INPUT... -- COMMAND...
#   setup_python                          sets PYTHON: $ARIANNA_PYTHON, else .venv with requirements.txt installed
#   set_runtime_flags                     sets RUNTIME_FLAGS from ARIANNA_DEVICE, ARIANNA_DTYPE, ARIANNA_BATCH_SIZE
# Steps record their command lines in $STEPS_DIR (set it before calling run_step).

fail() { echo "error: $*" >&2; exit 2; }

# Runs COMMAND unless OUTPUT exists, no INPUT (file or folder, searched recursively) is newer than it,
# and the step last finished with this same command line.
run_step() {
    local name="$1" output="$2" inputs=()
    shift 2
    while [[ "$1" != "--" ]]; do inputs+=("$1"); shift; done
    shift
    CURRENT_STEP="$name"
    local record="$STEPS_DIR/$name.cmd" command_line="$*"
    if [[ -e "$output" && -f "$record" && "$(cat "$record")" == "$command_line" ]] \
        && [[ -z "$(find "${inputs[@]}" -newer "$output" -print -quit 2>/dev/null)" ]]; then
        echo "skip: $name (up to date)"
        return 0
    fi
    echo "==> $name: $command_line"
    rm -f "$record"
    "$@"
    mkdir -p "$STEPS_DIR"
    printf '%s' "$command_line" > "$record"
}

setup_python() {
    if [[ -n "${ARIANNA_PYTHON:-}" ]]; then
        PYTHON="$ARIANNA_PYTHON"
        return 0
    fi
    CURRENT_STEP="venv"
    PYTHON=.venv/bin/python
    local stamp=.venv/.requirements-installed
    if [[ ! -x "$PYTHON" ]]; then
        command -v python3 >/dev/null || fail "python3 not found; install Python 3.10 or newer"
        echo "==> venv: python3 -m venv .venv"
        python3 -m venv .venv
    fi
    if [[ -f "$stamp" && ! requirements.txt -nt "$stamp" ]]; then
        echo "skip: venv (up to date)"
    else
        CURRENT_STEP="install"
        echo "==> install: pip install -r requirements.txt"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check -r requirements.txt
        touch "$stamp"
    fi
}

# Device, dtype and batch size for the trainings, passed only when set so the scripts' defaults apply otherwise.
# (Arrays are built by appending and expanded with ${a[@]+...}: macOS ships bash 3.2, where an empty
# "${a[@]}" under set -u is an error.)
set_runtime_flags() {
    RUNTIME_FLAGS=()
    if [[ -n "${ARIANNA_DEVICE:-}" ]]; then RUNTIME_FLAGS+=(--device="$ARIANNA_DEVICE"); fi
    if [[ -n "${ARIANNA_DTYPE:-}" ]]; then RUNTIME_FLAGS+=(--dtype="$ARIANNA_DTYPE"); fi
    if [[ -n "${ARIANNA_BATCH_SIZE:-}" ]]; then RUNTIME_FLAGS+=(--batch_size="$ARIANNA_BATCH_SIZE"); fi
}
