# Chimera: every target sets itself up; `make demo` and `make test` work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTOS  := $(wildcard protos/chimera/v1/*.proto)
STUBS   := chimera/v1/prediction_pb2.py

.PHONY: install proto demo test lint bench sysdeps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP) $(STUBS)

$(STUBS): $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch $(STUBS)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Debian packages the test suite drives for real (PostgreSQL server). Installed only when missing
# and only as root; otherwise the Postgres tests say exactly what is missing.
sysdeps:
	@if [ ! -x /usr/lib/postgresql/15/bin/initdb ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	  else echo "postgresql server binaries missing; install Debian's postgresql package"; fi; \
	fi

demo: install
	$(BIN)/chimera demo

test: install sysdeps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/chimera bench

clean:
	rm -rf $(VENV) chimera/v1/*_pb2*.py chimera/v1/*_pb2*.pyi
