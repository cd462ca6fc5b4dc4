# Set-up and the two everyday jobs. Everything installs into .venv; nothing is fetched from a model hub.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 3000
REDIS_PORT ?= 6379
REDIS_SERVER = $(shell command -v redis-server)
# The latent cache's Redis for `make serve`: loopback, no persistence, stopped with the service. Without
# redis-server (`make redis-server` installs it as root on Debian) the service runs without the cache.
WITH_REDIS = $(if $(REDIS_SERVER),$(REDIS_SERVER) --bind 127.0.0.1 --port $(REDIS_PORT) --save '' --appendonly no \
	--loglevel warning & trap 'kill $$! 2>/dev/null' EXIT INT TERM; DSD_REDIS_URL=redis://127.0.0.1:$(REDIS_PORT)/0)

.PHONY: setup serve test bench loadtest gpu-rehearsal clean redis-server redis-if-possible

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[serve,data,train,ops,hub,dev,faces,safety]'
	$(PY) -m dsd_serve.grpc_stubs
	touch $@

serve: setup redis-if-possible
	$(WITH_REDIS) BENTOML_DO_NOT_TRACK=True $(VENV)/bin/bentoml serve service:DSDService --host $(HOST) --port $(PORT)

test: setup redis-server
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/pipeline_step.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/latent_cache.py

loadtest: setup redis-server
	loadtest/run

# The GPU check (benchmarks/gpu_check.sh) rehearsed on the CPU in an environment like the GPU machine's (torch 2.11,
# transformers 5.17, Python 3.12), built into .rehearsal/ and kept there between runs.
gpu-rehearsal:
	benchmarks/rehearsal/run.sh

# The tests start their own redis-server on a free loopback port; this installs the binary (Debian, as root).
redis-server:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } || \
		{ echo "redis-server is missing; install it (Debian: apt-get install redis-server)" >&2; exit 1; }

redis-if-possible:
	@$(MAKE) --no-print-directory redis-server || echo "serving without the latent cache" >&2

clean:
	rm -rf $(VENV) outputs .pytest_cache .rehearsal
