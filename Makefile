# The same commands on a laptop and in CI. Every target bootstraps .venv from pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-cli bench-scoring bench-genome bench-biobank bench-compounds bench-gpu bench-faults clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins the local CPU build of torch; the package itself asks for a range.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# Compile the genome kernels now (numba caches them beside their source): the first genome
	# job, and so the first `make demo`, does not spend a minute or more compiling them.
	rm -rf var/warm && mkdir -p var/warm
	cd var/warm && ../../$(BIN)/medbatch genome compare --bfile ../../examples/genotypes/hm3_small \
	  --metric king --table > /dev/null
	cd var/warm && ../../$(BIN)/medbatch genome compare --bfile ../../examples/genotypes/hm3_small \
	  --query ../../examples/genotypes/hm3_small --metric king --table > /dev/null
	rm -rf var/warm
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medbatch demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/run.py

# `medbatch --help` and every command's help against a bare interpreter and eager imports.
bench-cli: $(STAMP)
	$(BIN)/python bench/cli_help.py

# Needs the real PostgreSQL and Redis (as make test does). MODEL=vitals-gru for the GRU.
bench-scoring: $(STAMP)
	$(BIN)/python bench/scoring.py --model $(or $(MODEL),breast-cancer)

# Needs plink2 and plink1.9 on PATH, and libopenblas0-pthread for a fair plink2 (see the script).
bench-genome: $(STAMP)
	$(BIN)/python bench/genome.py

# Pairs-only KING at N = 50,000 x M = 20,000 on 2 worker processes vs plink2 --make-king-table
# (needs plink2 on PATH; the cohort is simulated once into var/bench/biobank/, a few minutes).
bench-biobank: $(STAMP)
	$(BIN)/python bench/biobank.py

# RDKit vs FPSim2 vs medbatch on real MOSES molecules. FPSim2 and the MOSES data (molsets: its
# data file only, so --no-deps) are installed for the benchmark alone.
bench-compounds: $(STAMP)
	$(BIN)/python -m pip install --quiet FPSim2==0.7.4
	$(BIN)/python -m pip install --quiet --no-deps molsets==0.3.1
	$(BIN)/python bench/compounds.py

# The GPU paths beside the CPU's: KING pairs tiles (checked equal to the CPU's bit for bit), .bed
# decoding, and the scoring models' forward pass and attributions. Without CUDA, the CPU side alone.
bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu.py

# The fault scenarios of tests/faults/ at a larger size. Starts a Redis and a PostgreSQL of its
# own (needs redis-server and PostgreSQL's initdb, /usr/lib/postgresql/*/bin), never the shared ones.
bench-faults: $(STAMP)
	$(BIN)/python bench/faults.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
