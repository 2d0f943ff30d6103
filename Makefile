# InnerArianna. `make test` sets up .venv (requirements + pytest), builds the engine, runs the tests.
PYTHON ?= python3
VENV = .venv
VENV_PYTHON = $(VENV)/bin/python

.PHONY: test bench-train bench-llamacpp

# Its own stamp: train_arianna.sh installs requirements.txt alone (and stamps .requirements-installed), so the
# test tools are installed here whichever of the two commands runs first.
$(VENV)/.test-requirements-installed: requirements.txt requirements-test.txt
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

# Debian's chromium for the web chat's browser test (Playwright drives it; no browser is downloaded).
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# serve.py under 16 clients for 30 s against --slots 4: answered/503/lost, p50/p95 latency, tokens/s, memory.
.PHONY: bench-serve
bench-serve: $(VENV)/.test-requirements-installed librun.so
	$(VENV_PYTHON) bench/bench_serve.py

# Training tokens/s at the dim 288 / 6 layers / vocab 4096 shape: float32 eager against the fast paths.
bench-train: $(VENV)/.test-requirements-installed
	$(VENV_PYTHON) bench/bench_train.py

# llama.cpp for the interop tests and bench-llamacpp: node-llama-cpp's prebuilt CPU binary from npm (nothing is
# compiled or downloaded at run time), into the git-ignored bench/node_modules. On Linux x64 only that platform's
# binary package, not the CUDA/Vulkan ones npm would add as optional dependencies (83 MB instead of 730 MB).
NODE_LLAMA_CPP = 3.21.1
LLAMACPP = bench/node_modules/.node-llama-cpp-$(NODE_LLAMA_CPP)
LLAMACPP_PLATFORM := $(shell node -p 'process.platform + "-" + process.arch' 2>/dev/null)
$(LLAMACPP):
	command -v npm >/dev/null 2>&1 || apt-get install -y -qq nodejs npm
	cd bench && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-save --no-package-lock --no-audit --no-fund \
		--loglevel=error $(if $(filter linux-x64,$(LLAMACPP_PLATFORM)),--omit=optional @node-llama-cpp/linux-x64@$(NODE_LLAMA_CPP)) \
		node-llama-cpp@$(NODE_LLAMA_CPP)
	touch $@

# After $(LLAMACPP)'s definition: prerequisites are expanded as the Makefile is read.
# TESTS: what pytest runs (e.g. make test TESTS=tests/test_chat.py).
TESTS ?= tests
test: $(VENV)/.test-requirements-installed $(LLAMACPP) run rundebug runsan librun.so chromium aarch64-tools
	$(VENV_PYTHON) -m pytest -q $(TESTS)

# Shapes A, B, C of `make bench` through llama.cpp and through our engine, side by side (bench/llamacpp.py).
bench-llamacpp: $(VENV)/.test-requirements-installed $(LLAMACPP) librun.so
	$(VENV_PYTHON) bench/llamacpp.py

# Engine targets (run.c).
CC ?= gcc
CFLAGS_BASE = -O3 -Wall -Wextra -Wno-unknown-pragmas -std=gnu11
LDLIBS = -lm
# -march=native and OpenMP only where this compiler accepts them, so `make run` works everywhere.
NATIVE := $(shell echo 'int main(void){return 0;}' | $(CC) -march=native -x c - -o /dev/null 2>/dev/null && echo -march=native)
OPENMP := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)

.PHONY: run runfast runomp runportable rundebug runsan bench fuzz

# run.c and the headers it includes: one compile unit.
ENGINE = run.c run_kernels.h run_attention.h run_threads.h

# The fastest binary this compiler can make.
run: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(NATIVE) $(OPENMP) -o run run.c $(LDLIBS)

# llama2.c's names: runfast (single thread, -Ofast-like speed without changing results), runomp (OpenMP).
runfast: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(NATIVE) -o run run.c $(LDLIBS)

runomp: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(NATIVE) -fopenmp -o run run.c $(LDLIBS)

# Runs on any machine of this architecture: no -march, no OpenMP.
runportable: $(ENGINE)
	$(CC) $(CFLAGS_BASE) -o run run.c $(LDLIBS)

# AddressSanitizer + UndefinedBehaviorSanitizer; the tests feed bad input to this one.
SANITIZE = -O1 -g -Wall -Wextra -Wno-unknown-pragmas -std=gnu11 -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	-fno-omit-frame-pointer
rundebug: $(ENGINE)
	$(CC) $(SANITIZE) -o rundebug run.c $(LDLIBS)

# The same sanitizers on `make run`'s build (-march=native, OpenMP), so the SIMD kernels and the threads run under
# them too (the tests run both).
runsan: $(ENGINE)
	$(CC) $(SANITIZE) $(NATIVE) $(OPENMP) -o runsan run.c $(LDLIBS)

librun.so: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(NATIVE) $(OPENMP) -shared -fPIC -DARIANNA_LIBRARY -o librun.so run.c $(LDLIBS)

# aarch64 from an x86 Debian machine (on the ARM machine itself `make run` builds for it): ./run-aarch64 for a
# Raspberry Pi 5, Graviton 2+, Linux on Apple Silicon (NEON with sdot); AARCH64_MARCH=armv8-a for CPUs without the
# dot-product extension (Pi 4's Cortex-A72). Debian's cross gcc and qemu-user (tests/test_neon.py runs the builds
# under it): installed by aarch64-tools, as make test does, on an x86-64 Debian/Ubuntu machine as root (elsewhere
# it does nothing, and the tests say why they skip).
AARCH64_CC = aarch64-linux-gnu-gcc
AARCH64_MARCH ?= armv8.2-a+dotprod
.PHONY: aarch64-tools run-aarch64
aarch64-tools:
	@command -v $(AARCH64_CC) >/dev/null && command -v qemu-aarch64 >/dev/null || [ "$$(uname -m)" != x86_64 ] || \
		[ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || { log=$$(mktemp); { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user; } >$$log 2>&1 || \
		{ cat $$log >&2; rm -f $$log; exit 1; }; rm -f $$log; }

run-aarch64: $(ENGINE) aarch64-tools
	$(AARCH64_CC) $(CFLAGS_BASE) -march=$(AARCH64_MARCH) -fopenmp -o run-aarch64 run.c $(LDLIBS)

# Generation and prompt tokens/s for shapes B, A, C with random weights, fp32 and int8, 1 and 2 threads.
bench/bench_run: bench/bench_run.c $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(NATIVE) $(OPENMP) -o bench/bench_run bench/bench_run.c $(LDLIBS)

bench: bench/bench_run
	./bench/bench_run

# The same for an AVX2-only CPU (x86-64-v3: AVX2, FMA, no AVX-512), built and run here whatever this CPU has more.
.PHONY: bench-avx2
bench/bench_run_avx2: bench/bench_run.c $(ENGINE)
	$(CC) $(CFLAGS_BASE) -march=x86-64-v3 $(OPENMP) -o bench/bench_run_avx2 bench/bench_run.c $(LDLIBS)

bench-avx2: bench/bench_run_avx2
	./bench/bench_run_avx2

# libFuzzer on the model and tokenizer loaders (needs clang: apt-get install clang). Not part of `make test`.
# Findings land in fuzz/ as crash-*; FUZZ_SECONDS sets how long it runs.
FUZZ_SECONDS ?= 180
fuzz: fuzz/fuzz_loaders.c $(ENGINE)
	clang -g -O1 $(NATIVE) -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
		-o fuzz/fuzz_loaders fuzz/fuzz_loaders.c -lm
	mkdir -p fuzz/corpus
	./fuzz/fuzz_loaders -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -artifact_prefix=fuzz/ fuzz/corpus fuzz/seeds
