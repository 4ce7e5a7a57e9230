# Quasar build. `make` -> build/quasar; `make test` -> the CPU suite under ASan/UBSan.
# Non-standard installs: make CUDA_HOME=... NCCL_HOME=... MPI_HOME=... CJSON_HOME=... OPENBLAS_HOME=...
# CUDA=0 skips the CUDA backend; by default it is built whenever nvcc is found.
# MPI=0 skips the MPI backend (built whenever mpicc is found); NCCL=0 the NCCL one (built
# with CUDA whenever nccl.h is found).

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

# MPI: the flags come from MPI_HOME, else from the mpicc wrapper (Open MPI answers
# --showme:*, MPICH and Intel MPI print their whole command line for -show).
MPICC    ?= mpicc
MPI_HOME ?=
ifeq ($(origin MPI),undefined)
  MPI := $(if $(MPI_HOME)$(shell command -v $(MPICC) 2>/dev/null),1,0)
endif
ifeq ($(MPI),1)
  ifneq ($(MPI_HOME),)
    MPI_CFLAGS := -I$(MPI_HOME)/include
    MPI_LIBS   := -L$(MPI_HOME)/lib -Wl,-rpath,$(MPI_HOME)/lib -lmpi
  else ifneq ($(shell command -v $(MPICC) 2>/dev/null),)
    MPI_CFLAGS := $(or $(shell $(MPICC) --showme:compile 2>/dev/null),$(filter -I% -D%,$(shell $(MPICC) -show 2>/dev/null)))
    MPI_LIBS   := $(or $(shell $(MPICC) --showme:link 2>/dev/null),$(filter -L% -l% -Wl%,$(shell $(MPICC) -show 2>/dev/null)))
  else
    $(error MPI=1 but $(MPICC) is not on the PATH; set MPI_HOME)
  endif
  MPI_CFLAGS += -DQS_HAVE_MPI
endif

# NCCL rides on CUDA: its header from NCCL_HOME, else CUDA_HOME or /usr.
NCCL_H = $(firstword $(wildcard $(if $(NCCL_HOME),$(NCCL_HOME)/include/nccl.h,$(CUDA_HOME)/include/nccl.h /usr/include/nccl.h)))
ifneq ($(CUDA),1)
  override NCCL := 0
else ifeq ($(origin NCCL),undefined)
  NCCL := $(if $(NCCL_H),1,0)
endif
ifeq ($(NCCL),1)
  ifeq ($(NCCL_H),)
    $(error NCCL=1 but nccl.h is not in $(or $(NCCL_HOME),$(CUDA_HOME) or /usr)/include; set NCCL_HOME)
  endif
  NCCL_LIBDIRS = $(if $(filter /usr/include/nccl.h,$(NCCL_H)),,$(wildcard $(NCCL_H:%/include/nccl.h=%)/lib $(NCCL_H:%/include/nccl.h=%)/lib64))
  NCCL_CFLAGS  = -DQS_HAVE_NCCL -I$(CUDA_HOME)/include $(if $(NCCL_HOME),-I$(NCCL_HOME)/include)
  NCCL_LIBS    = $(foreach d,$(sort $(NCCL_LIBDIRS) $(CUDA_HOME)/lib64),-L$(d) -Wl$(comma)-rpath$(comma)$(d)) \
                 -lnccl -lcudart
endif

# -fno-math-errno: sqrtf and friends then vectorise (nothing reads errno after math calls).
CFLAGS_COMMON = -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -fopenmp -fno-math-errno -Iinclude $(MPI_CFLAGS) \
                $(if $(CJSON_HOME),-I$(CJSON_HOME)/include) \
                $(if $(OPENBLAS_HOME),-I$(OPENBLAS_HOME)/include,-I/usr/include/x86_64-linux-gnu)
LDLIBS_COMMON = $(if $(CJSON_HOME),-L$(CJSON_HOME)/lib -Wl$(comma)-rpath$(comma)$(CJSON_HOME)/lib) -lcjson \
                $(if $(OPENBLAS_HOME),-L$(OPENBLAS_HOME)/lib -Wl$(comma)-rpath$(comma)$(OPENBLAS_HOME)/lib) -lopenblas \
                -lpcre2-8 -lz -fopenmp -lm $(MPI_LIBS)
comma := ,

SRC      = $(wildcard csrc/*.c csrc/cpu/*.c)
# The CPU trees (ASan, fuzz) never hold NCCL; only the release tree does.
LIB_SRC  = $(filter-out csrc/main.c csrc/comm_nccl.c $(if $(filter 1,$(MPI)),,csrc/comm_mpi.c),$(SRC))
# The release tree links the CUDA backend when it is built, else its stub (the CPU trees always).
REL_SRC  = $(filter-out $(if $(CU_OBJ),csrc/backend_cuda_stub.c),$(LIB_SRC)) $(if $(filter 1,$(NCCL)),csrc/comm_nccl.c)
CU_SRC   = $(wildcard kernels/*.cu)
TEST_SRC = $(wildcard tests/test_*.c)

# Release tree (build/) and sanitizer tree (build/asan/) share the rules below.
REL_CFLAGS  = $(CFLAGS_COMMON) -O3 $(ARCH) -g $(NCCL_CFLAGS)
ASAN_CFLAGS = $(CFLAGS_COMMON) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow \
              -fno-sanitize-recover=all

ifeq ($(CUDA)$(if $(CU_SRC),y),1y)
  CU_OBJ = $(CU_SRC:%.cu=$(BUILD)/obj/%.o)
  CUDA_LIBS = -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart -lstdc++
  NVCCFLAGS ?= -O3 -std=c++17 -Iinclude -arch=sm_90 -Xcompiler -Wall,-Werror -Werror all-warnings
endif

.PHONY: all test test-asan test-valgrind test-gpu test-gpu-sanitizer fuzz fuzz-smoke clean
.SECONDARY:
all: $(BUILD)/quasar

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(REL_CFLAGS) -MMD -MP -c $< -o $@
$(BUILD)/obj/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@
$(BUILD)/libquasar.a: $(REL_SRC:%.c=$(BUILD)/obj/%.o) $(CU_OBJ)
	ar rcs $@ $^
$(BUILD)/quasar: $(BUILD)/obj/csrc/main.o $(BUILD)/libquasar.a
	$(CC) $^ -o $@ $(LDLIBS_COMMON) $(NCCL_LIBS) $(CUDA_LIBS)
# Benchmark programs (bench/*.c) against the release library.
$(BUILD)/bench/%: $(BUILD)/obj/bench/%.o $(BUILD)/libquasar.a
	@mkdir -p $(dir $@)
	$(CC) $^ -o $@ $(LDLIBS_COMMON) $(NCCL_LIBS) $(CUDA_LIBS)

# Turning MPI or NCCL on or off changes what the comm sources compile to.
COMM_STAMP := $(BUILD)/comm-config
COMM_CONFIG = MPI=$(MPI) $(MPI_CFLAGS) NCCL=$(NCCL) $(NCCL_CFLAGS)
$(shell mkdir -p $(BUILD) && echo '$(COMM_CONFIG)' | cmp -s - $(COMM_STAMP) || echo '$(COMM_CONFIG)' >$(COMM_STAMP))
$(foreach t,obj asan/obj fuzz/obj,$(foreach f,comm comm_mpi comm_nccl,$(BUILD)/$(t)/csrc/$(f).o)): $(COMM_STAMP)

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

# The CUDA backend on the CPU: kernels/ compiled as C++ by the host compiler against an
# emulated CUDA runtime, cuBLAS and CUB (tests/emu/include), under ASan/UBSan, and linked
# with the CPU library (less its CUDA stub) into tests/gpu/parity.c's harness and the
# CLI. tests/cli/cuda_emulated.sh runs both in `make test`: no GPU or nvcc needed.
EMU_CXXFLAGS = $(filter-out -std=c11 -D_POSIX_C_SOURCE=200809L,$(ASAN_CFLAGS)) -std=c++17 -Wno-unknown-pragmas \
               -Itests/emu/include
# Its comm layer has the NCCL backend too, over the emulated NCCL (MPI between CPU
# ranks), so `mpirun quasar train --device cuda` runs comm_nccl.c.
EMU_COMM_OBJ = $(BUILD)/asan/emu/obj/csrc/comm.o $(BUILD)/asan/emu/obj/csrc/comm_nccl.o
EMU_OBJ = $(CU_SRC:%.cu=$(BUILD)/asan/emu/%.o) $(EMU_COMM_OBJ) \
          $(filter-out %/backend_cuda_stub.o %/csrc/comm.o,$(LIB_SRC:%.c=$(BUILD)/asan/obj/%.o))
EMU_BINS = $(BUILD)/asan/emu/parity $(BUILD)/asan/emu/quasar $(BUILD)/asan/emu/comm_test
$(BUILD)/asan/emu/%.o: %.cu
	@mkdir -p $(dir $@)
	$(CXX) $(EMU_CXXFLAGS) -x c++ -MMD -MP -c $< -o $@
$(BUILD)/asan/emu/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -DQS_HAVE_NCCL -Itests/emu/include -MMD -MP -c $< -o $@
$(EMU_COMM_OBJ): $(COMM_STAMP)
$(BUILD)/asan/emu/parity: $(BUILD)/asan/obj/tests/gpu/parity.o $(EMU_OBJ)
	$(CXX) $(EMU_CXXFLAGS) $^ -o $@ $(LDLIBS_COMMON)
$(BUILD)/asan/emu/quasar: $(BUILD)/asan/obj/csrc/main.o $(EMU_OBJ)
	$(CXX) $(EMU_CXXFLAGS) $^ -o $@ $(LDLIBS_COMMON)
$(BUILD)/asan/emu/comm_test: $(BUILD)/asan/obj/tests/mpi/comm_test.o $(EMU_OBJ)
	$(CXX) $(EMU_CXXFLAGS) $^ -o $@ $(LDLIBS_COMMON)
# The multi-rank checks (the comm layer, ring attention): single-process always, over MPI
# ranks when MPI is built (tests/mpi/).
COMM_TEST  = $(BUILD)/asan/tests/mpi/comm_test $(BUILD)/asan/tests/mpi/ring_test

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

# The one test command: every CPU test (unit tests, CLI scripts, the comm layer over MPI
# ranks) under ASan+UBSan.
test: $(BUILD)/asan/quasar $(ASAN_TESTS) $(FUZZ_REPLAYS) $(COMM_TEST) $(EMU_BINS)
	QS_MPI=$(MPI) tests/run.sh $(BUILD)/asan
test-asan: test

# The CUDA backend against the CPU reference, on a GPU machine (tests/gpu/parity.c): every
# op, whole models, a training run. Without a visible device it fails with one line.
GPU_TEST = $(BUILD)/tests/gpu/parity
COMPUTE_SANITIZER ?= $(CUDA_HOME)/bin/compute-sanitizer
$(GPU_TEST): $(BUILD)/obj/tests/gpu/parity.o $(BUILD)/libquasar.a
	@mkdir -p $(dir $@)
	$(CC) $^ -o $@ $(LDLIBS_COMMON) $(NCCL_LIBS) $(CUDA_LIBS)
test-gpu: $(GPU_TEST)
	$(GPU_TEST)
# The same under each compute-sanitizer tool, with a shorter training run (the tools
# check every access of every kernel, which a longer run repeats).
test-gpu-sanitizer: $(GPU_TEST)
	@set -e; for tool in memcheck racecheck synccheck initcheck; do \
	  echo "# compute-sanitizer --tool $$tool"; \
	  QS_PARITY_STEPS=$${QS_PARITY_STEPS:-10} $(COMPUTE_SANITIZER) --tool $$tool --error-exitcode 1 $(GPU_TEST); \
	done

# A short train / resume / generate under valgrind (portable -march so valgrind knows
# every instruction).
test-valgrind:
	$(MAKE) BUILD=$(BUILD)/valgrind ARCH= CUDA=0 $(BUILD)/valgrind/quasar
	QUASAR=$(BUILD)/valgrind/quasar tests/valgrind.sh

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
