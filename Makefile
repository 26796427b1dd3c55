# gpunode.bringup: `make test` and `make demo` set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(CURDIR)/$(VENV)/bin/python
BUILD := $(CURDIR)/.build
# ansible-test and ansible-playbook find the collection at ansible_collections/gpunode/bringup:
# a symlink to this checkout for playbooks and pytest, a copy for ansible-test (it needs a real path).
COLLECTION_LINK := $(BUILD)/ansible_collections/gpunode/bringup
LAB_NVML := $(BUILD)/lab/lib/libnvidia-ml.so.1
LAB_NVIDIA_SMI := $(BUILD)/lab/bin/nvidia-smi

export ANSIBLE_HOME := $(BUILD)/ansible-home
export ANSIBLE_COLLECTIONS_PATH := $(BUILD)
export ANSIBLE_REMOTE_TMP := $(BUILD)/ansible-tmp
export ANSIBLE_LOCAL_TEMP := $(BUILD)/ansible-tmp
export PYTHONPATH := $(BUILD):$(CURDIR)

.PHONY: help venv collection lab lab-nvml test sanity lint docs units pytest stubs-check demo bench build clean

help:
	@echo "make test   set up (venv, collection path, lab NVML) and run every test with a summary line"
	@echo "make demo   set up and run gpu_node_bringup.yml on a four-node lab fleet, twice"
	@echo "make bench  run the benchmarks in bench/ (ratios against a baseline in the same run)"
	@echo "make lab    build the lab's real parts from their Go modules (Kubernetes control plane,"
	@echo "            NVIDIA's device plugin; lab/pins.env), cached in .build/lab/bin"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

collection:
	@mkdir -p $(dir $(COLLECTION_LINK)) $(ANSIBLE_HOME) $(BUILD)/ansible-tmp
	@ln -sfn ../../.. $(COLLECTION_LINK)

# The real Kubernetes control plane and NVIDIA's device plugin, from their Go modules; rebuilt
# only when lab/pins.env, lab/controlplane or the Go version change (stamps next to the binaries).
lab:
	$(PYTHON) -m lab.build

lab-nvml: $(LAB_NVML) $(LAB_NVIDIA_SMI)
$(LAB_NVML): $(filter-out lab/nvml/nvidia_smi.c,$(wildcard lab/nvml/*.c)) $(wildcard lab/nvml/*.h)
	@mkdir -p $(dir $@)
	gcc -std=c99 -O2 -Wall -Wextra -shared -fPIC -pthread -Wl,-soname,libnvidia-ml.so.1 -o $@ $(filter-out lab/nvml/nvidia_smi.c,$(wildcard lab/nvml/*.c))
$(LAB_NVIDIA_SMI): lab/nvml/nvidia_smi.c
	@mkdir -p $(dir $@)
	gcc -std=c99 -O2 -Wall -Wextra -o $@ lab/nvml/nvidia_smi.c -ldl

test: venv collection lab lab-nvml
	$(VPY) tests/run_all.py

# Single stages, for development (the same ones `make test` runs).
stubs-check sanity lint docs units: venv collection
	$(VPY) tests/run_all.py --only $@
pytest: venv collection lab lab-nvml
	$(VPY) tests/run_all.py --only $@

demo: venv collection lab lab-nvml
	$(VPY) -m lab.demo

bench: venv collection lab lab-nvml
	$(VPY) bench/run_all.py

build: venv
	$(VENV)/bin/ansible-galaxy collection build --force --output-path $(BUILD)/dist .

clean:
	rm -rf $(BUILD) tests/output
