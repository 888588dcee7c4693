# expertmesh — every target makes the virtualenv it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test proto bench certs clean

# Not an editable install: an editable one is hidden by the clone's own folder
# when Python runs from the folder holding the clone (`import expertmesh` finds
# the clone's folder first). `install` copies the current sources each time;
# tests, `make demo` and `python -m expertmesh...` from here use the sources.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q ".[test]"
	touch $(STAMP)

install: $(STAMP)
	$(PY) -m pip install -q --no-deps --force-reinstall .

demo: $(STAMP)
	$(PY) -m expertmesh.demo

test: $(STAMP)
	$(PY) -m pytest -q

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/expertmesh/v1/expertmesh.proto

# a test CA and node/router/client certificates for --tls-*; more hosts: make certs HOSTS="mini-a.local 10.0.0.2"
certs: $(STAMP)
	$(PY) -m expertmesh.testing.certs certs $(foreach h,$(HOSTS),--host $(h))

clean:
	rm -rf $(VENV) build *.egg-info

bench: $(STAMP)
	$(PY) benchmarks/run.py
