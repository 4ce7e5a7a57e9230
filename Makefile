# Quasar build. `make` -> build/quasar; `make test` -> the CPU suite under ASan/UBSan.
# Non-standard installs: make CUDA_HOME=... NCCL_HOME=... CJSON_HOME=... OPENBLAS_HOME=...
# CUDA=0 skips the CUDA backend; by default it is built whenever nvcc is found.

CC        ?= cc
CUDA_HOME ?= /usr/local/cuda
NVCC      ?= $(CUDA_HOME)/bin/nvcc
CJSON_HOME ?=
OPENBLAS_HOME ?=
NCCL_HOME ?=
ARCH      ?= -march=native
BUILD     ?= build

ifeq ($(origin CUDA),undefined)
  CUDA := $(if $(wildcard $(NVCC)),1,0)
endif

CFLAGS_COMMON = -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -fopenmp -Iinclude \
                $(if $(CJSON_HOME),-I$(CJSON_HOME)/include) \
                $(if $(OPENBLAS_HOME),-I$(OPENBLAS_HOME)/include,-I/usr/include/x86_64-linux-gnu)
LDLIBS_COMMON = $(if $(CJSON_HOME),-L$(CJSON_HOME)/lib -Wl$(comma)-rpath$(comma)$(CJSON_HOME)/lib) -lcjson \
                $(if $(OPENBLAS_HOME),-L$(OPENBLAS_HOME)/lib -Wl$(comma)-rpath$(comma)$(OPENBLAS_HOME)/lib) -lopenblas \
                -lpcre2-8 -lz -fopenmp -lm
comma := ,

SRC      = $(wildcard csrc/*.c csrc/cpu/*.c)
LIB_SRC  = $(filter-out csrc/main.c,$(SRC))
CU_SRC   = $(wildcard kernels/*.cu)
TEST_SRC = $(wildcard tests/test_*.c)

# Release tree (build/) and sanitizer tree (build/asan/) share the rules below.
REL_CFLAGS  = $(CFLAGS_COMMON) -O3 $(ARCH) -g
ASAN_CFLAGS = $(CFLAGS_COMMON) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow \
              -fno-sanitize-recover=all

ifeq ($(CUDA)$(if $(CU_SRC),y),1y)
  CU_OBJ = $(CU_SRC:%.cu=$(BUILD)/obj/%.o)
  CUDA_LIBS = -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -lstdc++
  NVCCFLAGS ?= -O3 -std=c++17 -Iinclude -arch=sm_90 -Xcompiler -Wall,-Werror
endif

.PHONY: all test test-asan test-valgrind fuzz fuzz-smoke clean
.SECONDARY:
all: $(BUILD)/quasar

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(REL_CFLAGS) -MMD -MP -c $< -o $@
$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@
$(BUILD)/libquasar.a: $(LIB_SRC:%.c=$(BUILD)/obj/%.o) $(CU_OBJ)
	ar rcs $@ $^
$(BUILD)/quasar: $(BUILD)/obj/csrc/main.o $(BUILD)/libquasar.a
	$(CC) $^ -o $@ $(LDLIBS_COMMON) $(CUDA_LIBS)
# Benchmark programs (bench/*.c) against the release library.
$(BUILD)/bench/%: $(BUILD)/obj/bench/%.o $(BUILD)/libquasar.a
	@mkdir -p $(dir $@)
	$(CC) $^ -o $@ $(LDLIBS_COMMON) $(CUDA_LIBS)

$(BUILD)/asan/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -MMD -MP -c $< -o $@
$(BUILD)/asan/libquasar.a: $(LIB_SRC:%.c=$(BUILD)/asan/obj/%.o)
	ar rcs $@ $^
$(BUILD)/asan/quasar: $(BUILD)/asan/obj/csrc/main.o $(BUILD)/asan/libquasar.a
	$(CC) $(ASAN_CFLAGS) $^ -o $@ $(LDLIBS_COMMON)
$(BUILD)/asan/tests/%: $(BUILD)/asan/obj/tests/%.o $(BUILD)/asan/libquasar.a
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $^ -o $@ $(LDLIBS_COMMON) -lcmocka

ASAN_TESTS = $(TEST_SRC:tests/%.c=$(BUILD)/asan/tests/%)

# Fuzzing (tests/fuzz/README.md). `make fuzz`: libFuzzer targets in $(BUILD)/fuzz/ (clang).
# `make test` replays each target's corpus and regressions through a gcc build of it.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 30
FUZZ_TARGETS  = $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BINS     = $(FUZZ_TARGETS:%=$(BUILD)/fuzz/%)
FUZZ_REPLAYS  = $(FUZZ_TARGETS:%=$(BUILD)/asan/fuzz/replay_%)
# Instrumented loops defeat `omp simd`, which clang reports as a warning.
FUZZ_CFLAGS   = $(ASAN_CFLAGS) -fsanitize=fuzzer-no-link -Wno-pass-failed

$(BUILD)/fuzz/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -MMD -MP -c $< -o $@
$(BUILD)/fuzz/libquasar.a: $(LIB_SRC:%.c=$(BUILD)/fuzz/obj/%.o)
	ar rcs $@ $^
$(FUZZ_BINS): $(BUILD)/fuzz/%: $(BUILD)/fuzz/obj/tests/fuzz/fuzz_%.o $(BUILD)/fuzz/libquasar.a
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $^ -o $@ $(LDLIBS_COMMON)
$(FUZZ_REPLAYS): $(BUILD)/asan/fuzz/replay_%: $(BUILD)/asan/obj/tests/fuzz/fuzz_%.o \
                 $(BUILD)/asan/obj/tests/fuzz/replay.o $(BUILD)/asan/libquasar.a
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $^ -o $@ $(LDLIBS_COMMON)

fuzz: $(FUZZ_BINS)
# Each target for FUZZ_SECONDS over a scratch copy of its corpus and regressions, so what
# it finds stays out of the source tree; a crash fails the run and lands in $(BUILD)/fuzz/.
fuzz-smoke: $(FUZZ_BINS)
	@set -e; for t in $(FUZZ_TARGETS); do \
	  dir=$(BUILD)/fuzz/corpus/$$t; rm -rf $$dir; mkdir -p $$dir; \
	  cp tests/fuzz/corpus/$$t/* $$(ls -d tests/fuzz/regressions/$$t/* 2>/dev/null) $$dir/; \
	  echo "fuzz-smoke: $$t for $(FUZZ_SECONDS)s"; \
	  $(BUILD)/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=$(BUILD)/fuzz/$$t- $$dir; \
	done

# The one test command: every CPU test (unit tests and CLI scripts) under ASan+UBSan.
test: $(BUILD)/asan/quasar $(ASAN_TESTS) $(FUZZ_REPLAYS)
	tests/run.sh $(BUILD)/asan
test-asan: test

# A short train / resume / generate under valgrind (portable -march so valgrind knows
# every instruction).
test-valgrind:
	$(MAKE) BUILD=$(BUILD)/valgrind ARCH= CUDA=0 $(BUILD)/valgrind/quasar
	QUASAR=$(BUILD)/valgrind/quasar tests/valgrind.sh

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
