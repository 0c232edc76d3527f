# Chimera: every target sets itself up; `make demo` and `make test` work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTOS  := $(wildcard protos/chimera/v1/*.proto)
# The Open Inference Protocol's proto keeps its package (`inference`); its stubs go beside Chimera's
# (chimera/v1/grpc_predict_v2_pb2*.py) by mapping its directory there.
OIP     := protos/inference/grpc_predict_v2.proto
OIPGEN  := $(BIN)/python -m grpc_tools.protoc -Ichimera/v1=protos/inference --python_out=. --pyi_out=. \
	--grpc_python_out=. $(OIP)
STUBS   := chimera/v1/prediction_pb2.py

.PHONY: install proto demo test acceptance lint bench bench-compare sysdeps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP) $(STUBS)

$(STUBS): $(PROTOS) $(OIP) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	$(OIPGEN)
	touch $(STUBS)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	$(OIPGEN)

# Debian packages the test suite drives for real: PostgreSQL server, Prometheus (+ promtool) and the Go
# toolchain with grpc-go/protobuf sources and protoc plugins (the Go client is built offline in GOPATH mode).
# Installed only when missing and only as root (one `apt-get update` first); otherwise the tests that need
# them say exactly what is missing.
SYSDEPS_PKGS := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
	golang-github-golang-protobuf-1-5-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc prometheus

sysdeps:
	@missing=""; \
	if [ ! -x /usr/lib/postgresql/15/bin/initdb ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  missing="postgresql"; \
	fi; \
	for p in $(SYSDEPS_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "sysdeps: installing$$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  else echo "sysdeps: missing Debian packages:$$missing (run make test as root or apt-get install them)"; fi; \
	fi

demo: install
	$(BIN)/chimera demo

# Issue 14: the demo five times in a row, each run checked (no rollback of its better versions); ~10 min,
# so `make test` runs it once.
demo-repeat: install
	CHIMERA_DEMO_RUNS=5 $(BIN)/python -m pytest -q -s tests/integration/test_demo.py

# --max-worker-restart=0: a crashed pytest-xdist worker ends the run and names its test. With restarts, a
# crash (2026-12-08 fresh clone) left the loadgroup scheduler handing the last tests to no worker: a hang.
test: install sysdeps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --max-worker-restart=0 --durations=40 -m "not acceptance"

# Full-count acceptance runs that do not fit make test's 30 minutes (make test runs shorter forms):
# the 1,000-run A/A simulation through the CLI, and every simulation scenario at its full count.
acceptance: install sysdeps
	$(BIN)/python -m pytest -q -m acceptance
	$(BIN)/chimera simulate --scenario all --runs 1000 --workers 2 --seed 2026 --json

lint: install
	$(BIN)/ruff check .

# BENCH_ARGS, e.g. BENCH_ARGS="--json bench.json --soak 600"; "--client python" measures with the grpc.aio
# client instead of the Go one. The Go load client (loadtest/goload) is built offline first, like the Go example.
bench: install sysdeps
	@case " $(BENCH_ARGS) " in *" --client python "*|*" --client=python "*) ;; *) loadtest/goload/build.sh ;; esac
	$(BIN)/chimera bench $(BENCH_ARGS)

# The same bench cases on an earlier revision and on this tree, interleaved (loadtest/bench_compare.py),
# e.g. make bench-compare OLD=7f7a5b2 COMPARE_ARGS="--rounds 3 --out /tmp/cmp" (--new <rev>: that revision
# instead of this tree, e.g. issue 13's redesign alone: OLD=7f7a5b2 COMPARE_ARGS="--new 29a5124 --rounds 10")
bench-compare: install sysdeps
	@test -n "$(OLD)" || { echo "OLD=<revision> is required"; exit 2; }
	$(BIN)/python -m loadtest.bench_compare --old $(OLD) $(COMPARE_ARGS)

clean:
	rm -rf $(VENV) chimera/v1/*_pb2*.py chimera/v1/*_pb2*.pyi
