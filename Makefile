# nzserve — build, test, benchmark, fuzz.
#   make            build library, tools and tests (build/)
#   make test       run the whole test suite (C unit tests + pytest)
#   make test-ui    the web playground in headless Chromium (screenshots in build/ui-screens/)
#   make asan       run the whole suite under ASan+UBSan (build-asan/)
#   make valgrind   run the C tests, the CLI tests and a server session under valgrind memcheck
#   make bench      benchmarks (not tests): codec ratios and speeds
#   make bench-peers  batch-1 GEMV against fp32 BLAS and llama.cpp's ggml kernels (npm), with a plot
#   make fuzz       libFuzzer targets, FUZZ_SECONDS each (clang)
#   make deps       install every Debian package the build and tests need
#   make loadtest   60 s of mixed traffic at 64 connections against nzserve (wrk, loopback), then
#                   batching against none: 32 dialogue / AT greedy / AT beam clients, 60 s each (tests/load/batching.py)
#   make capacity   memory and requests/s per core for the capacity guide (config/k8s/README.md)
#   make serve      start nzserve on the bundled demo model (config/nzserve.json)
#   make demo       inspect, verify and try the demo model offline (nzp)
#   make docker-test  build the Dockerfile and run the image with podman
#   make format     apply .clang-format

CC       ?= gcc
BUILD    ?= build
OPT      ?= -O2
SAN      ?=
CFLAGS   ?= $(OPT) -g
CFLAGS   += -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wshadow -Wno-unused-parameter -Wno-format-truncation -Iengine -Imodels -Iserver $(SAN)
CXX      ?= g++
CXXFLAGS ?= $(OPT) -g
CXXFLAGS += -std=c++17 -Wall -Wextra -Wshadow -Iengine -Imodels $(SAN)
LDLIBS   += -ljansson -lzstd -lxxhash -lopenblas -lm -lpthread
# what build/libnzmodels.a needs on top of LDLIBS (the SentencePiece shim is C++)
MODELS_LDLIBS := -lsentencepiece -lstdc++
PYTHON   ?= /usr/bin/python3
FUZZ_SECONDS ?= 30

ENGINE_SRC := $(wildcard engine/*.c)
ENGINE_OBJ := $(ENGINE_SRC:%.c=$(BUILD)/%.o)
ENGINE_LIB := $(BUILD)/libnzengine.a

# model families, tokenizer (models/*.c except the nzp tool, models/*.cc)
MODELS_SRC := $(filter-out models/nzp.c,$(wildcard models/*.c)) $(wildcard models/*.cc)
MODELS_OBJ := $(patsubst %,$(BUILD)/%.o,$(basename $(MODELS_SRC)))
MODELS_LIB := $(BUILD)/libnzmodels.a

# the HTTP server (server/*.c except main.c) and its binary
SERVER_SRC := $(filter-out server/main.c,$(wildcard server/*.c))
# the web playground's files, embedded at build time (server/srv_ui.h)
UI_FILES := $(sort $(filter-out server/ui/embed.sh,$(wildcard server/ui/*)))
SERVER_OBJ := $(SERVER_SRC:%.c=$(BUILD)/%.o) $(BUILD)/server/srv_ui_assets.o
SERVER_LIB := $(BUILD)/libnzserver.a
SERVER_LDLIBS := -lmicrohttpd
NZSERVE  := $(BUILD)/nzserve

TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
NZP      := $(BUILD)/nzp
PARITY   := $(BUILD)/parity_runner
TOK_CLI  := $(BUILD)/tok_cli
NAT_RUNNER := $(BUILD)/nat_runner
T5MD_RUNNER := $(BUILD)/t5md_runner

.PHONY: all test test-ui ctest pytest asan valgrind bench bench-peers fuzz deps demo docker-test clean format loadtest capacity serve
all: $(ENGINE_LIB) $(MODELS_LIB) $(SERVER_LIB) $(NZP) $(NZSERVE) $(PARITY) $(TOK_CLI) $(NAT_RUNNER) $(T5MD_RUNNER) $(TEST_BIN)

$(BUILD)/%.o: %.c $(wildcard engine/*.h models/*.h server/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

# the checksum's vector builds (dispatched at run time, see engine/nz_hash.c)
$(BUILD)/engine/nz_hash_avx2.o: CFLAGS += -mavx2
$(BUILD)/engine/nz_hash_avx512.o: CFLAGS += -mavx512f -mavx512bw
# the fused decode-and-multiply GEMV's vector kernels (dispatched at run time, see engine/nz_gemv.c)
$(BUILD)/engine/nz_gemv_avx2.o: CFLAGS += -mavx2 -mfma -mpopcnt
$(BUILD)/engine/nz_gemv_avx512.o: CFLAGS += -mavx512f -mavx512bw -mavx512vl -mpopcnt
# the escape code's AVX2 kernels (engine/nz_esc.h)
$(BUILD)/engine/nz_esc_avx2.o: CFLAGS += -mavx2 -mfma -mpopcnt
# the row-invariant fp32 matmul's AVX2 kernel (dispatched at run time, see engine/nz_gemm.c)
$(BUILD)/engine/nz_gemm_avx2.o: CFLAGS += -mavx2 -mfma
# the matmul kernels stay optimised and uninstrumented in sanitizer builds (make asan): instrumented at -O1
# they run ~20x slower than the OpenBLAS they replaced (which was never instrumented) and the suite would
# take hours; make valgrind and their own unit tests cover their memory accesses
KERNEL_OBJ := $(BUILD)/engine/nz_gemm.o $(BUILD)/engine/nz_gemm_avx2.o $(BUILD)/engine/nz_esc_avx2.o
$(KERNEL_OBJ): CFLAGS += -O2 $(if $(SAN),-fno-sanitize=all)
# joins of the generic layouts (binary16), dispatched at run time in engine/nz_codec_dec.c
$(BUILD)/engine/nz_join_avx2.o: CFLAGS += -mavx2 -mf16c

$(BUILD)/%.o: %.cc $(wildcard engine/*.h models/*.h)
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) -c $< -o $@

$(MODELS_LIB): $(MODELS_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/server/srv_ui_assets.c: $(UI_FILES) server/ui/embed.sh
	@mkdir -p $(dir $@)
	sh server/ui/embed.sh $@ $(UI_FILES)

$(BUILD)/server/srv_ui_assets.o: $(BUILD)/server/srv_ui_assets.c server/srv_ui.h
	$(CC) $(CFLAGS) -c $< -o $@

$(SERVER_LIB): $(SERVER_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(NZSERVE): $(BUILD)/server/main.o $(SERVER_LIB) $(MODELS_LIB) $(ENGINE_LIB)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS) $(MODELS_LDLIBS) $(SERVER_LDLIBS)

$(ENGINE_LIB): $(ENGINE_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(NZP): $(BUILD)/models/nzp.o $(MODELS_LIB) $(ENGINE_LIB)
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS) $(MODELS_LDLIBS)

# runs engine layers on .nzp weights for the PyTorch parity tests (tests/python/test_parity.py)
$(PARITY): tests/parity_runner.c $(wildcard tests/*.h) $(ENGINE_LIB)
	$(CC) $(CFLAGS) -Itests $< $(ENGINE_LIB) -o $@ $(LDLIBS)

# tokenizer driver for tests/python/test_tokenizer.py
$(TOK_CLI): tests/tok_cli.c $(MODELS_LIB) $(ENGINE_LIB)
	$(CC) $(CFLAGS) $< $(MODELS_LIB) $(ENGINE_LIB) -o $@ $(LDLIBS) $(MODELS_LDLIBS)

# translation model driver for tests/python/test_nat_parity.py
$(NAT_RUNNER): tests/nat_runner.c $(MODELS_LIB) $(ENGINE_LIB)
	$(CC) $(CFLAGS) $< $(MODELS_LIB) $(ENGINE_LIB) -o $@ $(LDLIBS) $(MODELS_LDLIBS)

# dialogue model driver for tests/python/test_t5md_parity.py
$(T5MD_RUNNER): tests/t5md_runner.c $(MODELS_LIB) $(ENGINE_LIB)
	$(CC) $(CFLAGS) $< $(MODELS_LIB) $(ENGINE_LIB) -o $@ $(LDLIBS) $(MODELS_LDLIBS)

$(BUILD)/tests/%: tests/%.c $(wildcard tests/*.h tests/fuzz/*.h) $(SERVER_LIB) $(MODELS_LIB) $(ENGINE_LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -Iserver $< $(SERVER_LIB) $(MODELS_LIB) $(ENGINE_LIB) -o $@ $(LDLIBS) $(MODELS_LDLIBS) $(SERVER_LDLIBS) -lcmocka

# Whole suite: every C test binary, then the Python/CLI tests against $(NZP).
test: all
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; $$t; done
	NZP=$(abspath $(NZP)) NZSERVE=$(abspath $(NZSERVE)) PARITY_RUNNER=$(abspath $(PARITY)) TOK_CLI=$(abspath $(TOK_CLI)) NAT_RUNNER=$(abspath $(NAT_RUNNER)) T5MD_RUNNER=$(abspath $(T5MD_RUNNER)) $(PYTHON) -m pytest -q tests/python

# The web playground (server/ui/, GET /) in headless Chromium (Debian's chromium,
# driven by npm's playwright-core, pinned in tests/ui/package-lock.json and
# installed into tests/ui/node_modules by tests/ui/run.sh): translate, a two-turn
# chat with every decoder streaming, a beam turn with a length penalty, 375 px
# width, an API-key server.
# Screenshots in $(BUILD)/ui-screens/.
test-ui: $(NZSERVE)
	NZSERVE=$(abspath $(NZSERVE)) UI_SCREENS=$(abspath $(BUILD))/ui-screens bash tests/ui/run.sh

ctest: all
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; $$t; done

asan:
	$(MAKE) test BUILD=build-asan OPT=-O1 SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"

valgrind: all
	@set -e; for t in $(TEST_BIN); do echo "== valgrind $$t"; \
	  NZ_TEST_QUICK=1 valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite $$t; done
	NZ_TEST_QUICK=1 NZP=$(abspath tests/python/valgrind_nzp.sh) NZP_REAL=$(abspath $(NZP)) PARITY_RUNNER=$(abspath $(PARITY)) TOK_CLI=$(abspath $(TOK_CLI)) NAT_RUNNER=$(abspath $(NAT_RUNNER)) T5MD_RUNNER=$(abspath $(T5MD_RUNNER)) $(PYTHON) -m pytest -q tests/python \
	  --ignore=tests/python/test_server.py --ignore=tests/python/test_dialogue_server.py --deselect tests/python/test_demo_model.py::test_sample_bleu_floor
	NZP=$(abspath $(NZP)) NZSERVE=$(abspath $(NZSERVE)) $(PYTHON) tests/python/valgrind_server.py

BENCH_BIN := $(BUILD)/bench_codec $(BUILD)/bench_matmul
$(BUILD)/bench_%: tests/bench/bench_%.c $(ENGINE_LIB)
	$(CC) $(CFLAGS) $< $(ENGINE_LIB) -o $@ $(LDLIBS)
bench: $(BENCH_BIN) $(NZP)
	$(BUILD)/bench_codec
	$(BUILD)/bench_matmul

# Batch-1 GEMV against peers (not in CI): fp32 OpenBLAS, a bf16 GEMV of our own,
# llama.cpp's ggml kernels (bf16, f16, q8_0) from the prebuilt libraries of npm's
# node-llama-cpp (its linux-x64 binary package, fetched once into PEERS_DIR with
# npm pack), our esc lossless / lossy-3 and rANS modes; 1 and 2 threads.
# Writes $(BUILD)/bench_peers.tsv and, with gnuplot (apt-get install gnuplot-nox),
# docs/bench_peers.png.
PEERS_DIR ?= /var/tmp/nzserve-peers
NLC_VERSION := 3.21.1
GGML_DIR := $(PEERS_DIR)/package/bins/linux-x64
$(BUILD)/bench_peers: tests/bench/bench_peers.c $(ENGINE_LIB)
	$(CC) $(CFLAGS) -mavx2 -mfma $< $(ENGINE_LIB) -o $@ $(LDLIBS) -ldl
bench-peers: $(BUILD)/bench_peers
	@mkdir -p $(PEERS_DIR)
	@test -f $(GGML_DIR)/libggml-base.so || { cd $(PEERS_DIR) && npm pack @node-llama-cpp/linux-x64@$(NLC_VERSION) \
	  && tar xzf node-llama-cpp-linux-x64-$(NLC_VERSION).tgz; }
	$(BUILD)/bench_peers --ggml $(GGML_DIR) --tsv $(BUILD)/bench_peers.tsv
	@if command -v gnuplot >/dev/null; then bash tests/bench/plot_peers.sh $(BUILD)/bench_peers.tsv docs/bench_peers.png; \
	  else echo "bench-peers: no gnuplot (apt-get install gnuplot-nox): plot skipped"; fi

FUZZ_TARGETS := $(patsubst tests/fuzz/%.c,build-fuzz/%,$(wildcard tests/fuzz/fuzz_*.c))
# (built with AVX2 so that the vector kernels are fuzzed too, not their stubs)
build-fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_common.h $(ENGINE_SRC) $(wildcard engine/*.h)
	@mkdir -p build-fuzz
	clang -O1 -g -std=c11 -D_GNU_SOURCE -mavx2 -mfma -mpopcnt -mf16c -Iengine -fsanitize=fuzzer,address,undefined \
	  -fno-sanitize-recover=undefined $< $(ENGINE_SRC) -o $@ $(LDLIBS)
# the server's request parser: engine sources plus server/srv_api.c
build-fuzz/fuzz_srv_request: tests/fuzz/fuzz_srv_request.c tests/fuzz/fuzz_server.h server/srv_api.c server/srv_api.h $(ENGINE_SRC)
	@mkdir -p build-fuzz
	clang -O1 -g -std=c11 -D_GNU_SOURCE -Iengine -Iserver -fsanitize=fuzzer,address,undefined \
	  -fno-sanitize-recover=undefined $< server/srv_api.c $(ENGINE_SRC) -o $@ $(LDLIBS)
fuzz: $(FUZZ_TARGETS)
	@set -e; for f in $(FUZZ_TARGETS); do n=$$(basename $$f); mkdir -p build-fuzz/corpus-$$n; \
	  echo "== $$n for $(FUZZ_SECONDS)s"; \
	  dict=""; [ -f tests/fuzz/$$n.dict ] && dict="-dict=tests/fuzz/$$n.dict"; \
	  $$f -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -print_final_stats=1 $$dict \
	      -artifact_prefix=build-fuzz/ build-fuzz/corpus-$$n tests/fuzz/corpus/$$n > build-fuzz/$$n.log 2>&1 \
	      || { tail -n 60 build-fuzz/$$n.log; exit 1; }; tail -n 12 build-fuzz/$$n.log; done

deps:
	bash .ci/deps.sh

# Bounded load test on loopback (wrk): LOAD_SECONDS, LOAD_CONNECTIONS, LOAD_MODEL (see the script).
loadtest: $(NZSERVE)
	NZSERVE=$(abspath $(NZSERVE)) bash tests/load/loadtest.sh
	NZSERVE=$(abspath $(NZSERVE)) $(PYTHON) tests/load/batching.py

# The capacity guide's numbers (config/k8s/README.md): memory per model, weight
# mode and cache budget, and requests/s per core of each endpoint (wrk, loopback).
capacity: $(NZSERVE) $(NZP)
	$(PYTHON) tests/load/capacity.py --nzserve $(abspath $(NZSERVE)) --nzp $(abspath $(NZP)) $(CAPACITY_ARGS)

# Build the Docker image (it compiles nzserve and nzp itself) and run it with
# podman: no Docker engine needed; root; DOCKER_TEST_ARGS=--keep keeps the image.
docker-test:
	bash tests/docker/docker_test.sh $(DOCKER_TEST_ARGS)

# Start nzserve on the bundled demo model (config/nzserve.json: 127.0.0.1:8080);
# NZSERVE_* variables or ARGS="--port 9000 ..." override settings. Ctrl-C stops it.
serve: $(NZSERVE)
	$(NZSERVE) --config config/nzserve.json $(ARGS)

# The bundled demo model: what the codec did, every tile verified, decode speed,
# and a few sample sentences translated offline.
DEMO_NZP := models/demo/nat-ende.nzp
demo: $(NZP)
	$(NZP) info $(DEMO_NZP)
	$(NZP) verify $(DEMO_NZP)
	$(NZP) bench --seconds 1 $(DEMO_NZP)
	head -n 5 models/demo/nat-ende.sample.en | $(NZP) translate $(DEMO_NZP) --rerank

format:
	clang-format -i engine/*.[ch] models/*.[ch] models/*.cc server/*.[ch] tests/*.[ch] tests/*/*.[ch]

clean:
	rm -rf build build-asan build-fuzz
