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

# Debian's qemu-user: tests/test_dispatch.py runs `make run`'s binary on older x86-64 CPUs with qemu-x86_64 -cpu.
# Installed on an x86-64 Debian/Ubuntu machine as root (elsewhere the test says why it skips).
.PHONY: qemu-user
qemu-user:
	@command -v qemu-x86_64 >/dev/null || [ "$$(uname -m)" != x86_64 ] || [ "$$(id -u)" != 0 ] || \
		! command -v apt-get >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null; }

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
test: $(VENV)/.test-requirements-installed $(LLAMACPP) run rundebug runsan librun.so chromium qemu-user aarch64-tools
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

# x86-64 with GCC: one binary for every x86-64 CPU. run.c is built for baseline x86-64 (its kernels are the scalar
# path), run_avx2.c, run_avxvnni.c and run_avx512.c build the same kernels for AVX2, AVX2 with AVX-VNNI and AVX-512
# VNNI under #pragma GCC target, and a model is loaded for the best of them this CPU runs (run_isa.h;
# ARIANNA_ISA=avx512|avxvnni|avx2|scalar forces one). It is as fast as -march=native (make bench-isa). Elsewhere
# (aarch64, a compiler without GCC's target pragmas or older than GCC 11): -march=native.
comma := ,
pragma_defines = printf '\043pragma GCC target("$(1)")\n\043ifndef $(2)\n\043error\n\043endif\nint main(void){return 0;}\n' \
	| $(CC) -x c - -o /dev/null 2>/dev/null
DISPATCH := $(shell $(call pragma_defines,arch=x86-64-v4$(comma)avx512vnni,__AVX512VNNI__) && \
	$(call pragma_defines,arch=x86-64-v3$(comma)avxvnni,__AVXVNNI__) && echo yes)
ISA = $(if $(DISPATCH),-DARIANNA_DISPATCH,$(NATIVE))
ISA_SOURCES = $(if $(DISPATCH),run_avx512.c run_avxvnni.c run_avx2.c)

.PHONY: run runfast runomp runnative runportable rundebug runsan bench bench-isa fuzz

# run.c and the headers it includes: one compile unit (with the dispatching build's three kernel files).
ENGINE = run.c run_kernels.h run_attention.h run_threads.h run_isa.h run_avx512.c run_avxvnni.c run_avx2.c

# The fastest binary this compiler can make, for every CPU of this architecture where it dispatches.
run: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(ISA) $(OPENMP) -o run run.c $(ISA_SOURCES) $(LDLIBS)

# llama2.c's names: runfast (single thread, -Ofast-like speed without changing results), runomp (OpenMP).
runfast: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(ISA) -o run run.c $(ISA_SOURCES) $(LDLIBS)

runomp: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(ISA) -fopenmp -o run run.c $(ISA_SOURCES) $(LDLIBS)

# For this machine's CPU only: -march=native, one set of kernels, OpenMP.
runnative: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(NATIVE) $(OPENMP) -o run run.c $(LDLIBS)

# Runs on any machine of this architecture with nothing but the C library: no -march, no OpenMP (no libgomp).
runportable: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(if $(DISPATCH),-DARIANNA_DISPATCH) -o run run.c $(ISA_SOURCES) $(LDLIBS)

# AddressSanitizer + UndefinedBehaviorSanitizer; the tests feed bad input to this one.
SANITIZE = -O1 -g -Wall -Wextra -Wno-unknown-pragmas -std=gnu11 -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	-fno-omit-frame-pointer
rundebug: $(ENGINE)
	$(CC) $(SANITIZE) -o rundebug run.c $(LDLIBS)

# The same sanitizers on `make run`'s build (dispatching, OpenMP), so the SIMD kernels and the threads run under
# them too (the tests run both).
runsan: $(ENGINE)
	$(CC) $(SANITIZE) $(ISA) $(OPENMP) -o runsan run.c $(ISA_SOURCES) $(LDLIBS)

librun.so: $(ENGINE)
	$(CC) $(CFLAGS_BASE) $(ISA) $(OPENMP) -shared -fPIC -DARIANNA_LIBRARY -o librun.so run.c $(ISA_SOURCES) $(LDLIBS)

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
	$(CC) $(CFLAGS_BASE) $(ISA) $(OPENMP) -o bench/bench_run bench/bench_run.c $(ISA_SOURCES) $(LDLIBS)

bench: bench/bench_run
	./bench/bench_run

# Whether dispatch costs anything: `make bench`'s rows (shapes B and A, 1 thread), three rounds, for each path of the
# dispatching build right after a single-path build of the same level (-march=native, Alder Lake's x86-64-v3 with
# AVX-VNNI where the CPU has it, x86-64-v3, baseline x86-64).
BENCH_LEVELS = native:avx512 alderlake:avxvnni x86-64-v3:avx2 x86-64:scalar
bench-isa: bench/bench_run
	for level in $(BENCH_LEVELS); do march=$${level%%:*}; \
		$(CC) $(CFLAGS_BASE) -march=$$march $(OPENMP) -o bench/bench_run_$$march bench/bench_run.c $(LDLIBS) || exit 1; done
	@echo "| shape | weights | threads | gen tok/s | gen tok/s, first run | prompt tok/s | prompt/gen | gen tok/s x threads per CPU s | prompt, same |"
	for round in 1 2 3; do for shape in B A; do for level in $(BENCH_LEVELS); do march=$${level%%:*}; isa=$${level##*:}; \
		[ $$isa != avxvnni ] || grep -qw avx_vnni /proc/cpuinfo || continue; \
		echo "-march=$$march, then ARIANNA_ISA=$$isa:"; ./bench/bench_run_$$march 128 128 $$shape 1 | grep '^| [BA] '; \
		ARIANNA_ISA=$$isa ./bench/bench_run 128 128 $$shape 1 | grep '^| [BA] ' || true; done; done; done

# The same rows for an AVX2-only CPU (AVX2 and FMA, no AVX-512): the dispatching build forced onto its AVX2 path.
.PHONY: bench-avx2
bench-avx2: bench/bench_run
	ARIANNA_ISA=avx2 ./bench/bench_run

# libFuzzer on the model and tokenizer loaders (needs clang: apt-get install clang). Not part of `make test`.
# Findings land in fuzz/ as crash-*; FUZZ_SECONDS sets how long it runs.
FUZZ_SECONDS ?= 180
fuzz: fuzz/fuzz_loaders.c $(ENGINE)
	clang -g -O1 $(NATIVE) -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
		-o fuzz/fuzz_loaders fuzz/fuzz_loaders.c -lm
	mkdir -p fuzz/corpus
	./fuzz/fuzz_loaders -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -artifact_prefix=fuzz/ fuzz/corpus fuzz/seeds
