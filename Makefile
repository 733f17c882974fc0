# zsl-pipeline — `make demo` sets everything up and runs the whole flow; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ZSL := $(BIN)/zsl
DEMO := runs/demo
OPENCLIPART ?= /usr/share/openclipart
DEMO_CORPUS ?= 1500
# faiss-gpu where a GPU is visible, faiss-cpu elsewhere (never both: they are the same module).
FAISS_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install tools demo test test-slow test-all bench bench-extract bench-scale bench-serve bench-filters bench-reload bench-pipeline bench-relabel bench-decode bench-compare device-check gpu-check eval redo-share clean help

help:
	@echo "make demo   - install into $(VENV) and run extract -> classes -> train -> evaluate -> label -> index -> search -> report"
	@echo "make test   - run the default test suite (slow/gpu/integration tests excluded)"
	@echo "make bench  - extraction and labeling throughput vs bare loops -> benchmarks/results/results.json"
	@echo "make bench-pipeline - zsl run at 1M images: idle rerun and relabel-from-features vs fresh labelling -> benchmarks/results/pipeline.json"
	@echo "make bench-extract - zsl extract on CPUs, PyTorch vs ONNX Runtime vs bare ONNX Runtime loops, 5,000 real images per data set -> benchmarks/results/extract.json"
	@echo "make bench-scale - label/index at SCALE_ROWS rows vs bare loops and autofaiss -> benchmarks/results/SCALE.md"
	@echo "make bench-serve - load test of zsl serve on loopback (PyTorch vs ONNX Runtime text model; 50 clients of mixed text/image/thumbnail/filtered queries) -> benchmarks/results/serve.json"
	@echo "make bench-compare BASE=<rev> - bench-scale (100k, ours) and bench-serve (onnx) on BASE and this tree, alternating -> benchmarks/results/compare.json"
	@echo "make bench-filters - label filters, old post-filter vs search among the allowed ids, two label geometries, FILTER_ROWS=200000 -> benchmarks/results/filters.json (FILTER_ROWS=1000000 -> filters_1m.json)"
	@echo "make bench-reload - zsl serve under load while zsl index adds shards, then rebuilds -> benchmarks/results/reload.json"
	@echo "make bench-relabel - zsl label fresh vs an in-place relabel with its label diff after adding classes, RELABEL_ROWS=1000000 -> benchmarks/results/relabel.json"
	@echo "make bench-decode - peak RSS decoding a 10,000-image tar, whole vs streamed -> benchmarks/results/decode_memory.json"
	@echo "make device-check - prepare .device/ (wheels + real JPEGs, <= 64 MiB) for infra/device/run-check.sh on a borrowed GPU machine"
	@echo "make gpu-check - CUDA extraction and faiss-gpu figures -> benchmarks/results/gpu.json (needs a GPU)"
	@echo "make eval   - every ZSL method on real data -> benchmarks/results/EVAL.md"
	@echo "make redo-share - share of a killed extraction computed twice -> benchmarks/results/redo_share.json"

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,eval,$(FAISS_EXTRA)]"
	touch $@

install: $(VENV)/.installed

# Real third-party tools the tests and benchmarks run, each in its own venv (their pins clash with
# ours: autofaiss needs numpy<2 and pyarrow<17): img2dataset writes the test inputs, autofaiss reads
# our exports and is the index benchmark's reference; clip-retrieval's ClipClient queries `zsl serve`
# (the wheel alone: its package __init__ imports the whole backend, the client needs only requests).
TOOLS := .venv-tools
IMG2DATASET_VERSION := 1.47.0
AUTOFAISS_VERSION := 2.18.0
CLIP_RETRIEVAL_VERSION := 2.45.0
$(TOOLS)/img2dataset/.installed:
	$(PYTHON) -m venv $(TOOLS)/img2dataset
	$(TOOLS)/img2dataset/bin/pip install --quiet img2dataset==$(IMG2DATASET_VERSION)
	touch $@

$(TOOLS)/autofaiss/.installed:
	$(PYTHON) -m venv $(TOOLS)/autofaiss
	$(TOOLS)/autofaiss/bin/pip install --quiet autofaiss==$(AUTOFAISS_VERSION) "numpy<2" "pyarrow<17"
	touch $@

$(TOOLS)/clip-retrieval/.installed:
	$(PYTHON) -m venv $(TOOLS)/clip-retrieval
	$(TOOLS)/clip-retrieval/bin/pip install --quiet --no-deps clip-retrieval==$(CLIP_RETRIEVAL_VERSION)
	$(TOOLS)/clip-retrieval/bin/pip install --quiet requests
	touch $@

tools: $(TOOLS)/img2dataset/.installed $(TOOLS)/autofaiss/.installed $(TOOLS)/clip-retrieval/.installed

demo: install
	$(ZSL) demo-data --output $(DEMO)/data --per-class 100
	$(ZSL) extract --input $(DEMO)/data/train --output $(DEMO)/features/train --shard-size 200
	$(ZSL) extract --input $(DEMO)/data/test --output $(DEMO)/features/test --shard-size 200
	$(ZSL) classes --input conf/demo/classes.yaml --output $(DEMO)/classes
	$(ZSL) train --features $(DEMO)/features/train --classes $(DEMO)/classes --seen conf/demo/split.json --method devise --output $(DEMO)/models/devise
	$(ZSL) train --features $(DEMO)/features/train --classes $(DEMO)/classes --seen conf/demo/split.json --method eszsl --semantics attributes --output $(DEMO)/models/eszsl
	$(ZSL) evaluate --model $(DEMO)/models/devise --model $(DEMO)/models/eszsl --features $(DEMO)/features/test --classes $(DEMO)/classes --unseen conf/demo/split.json --json $(DEMO)/evaluation.json
	$(ZSL) label --model $(DEMO)/models/devise --features $(DEMO)/features/test --classes $(DEMO)/classes --output $(DEMO)/labels --overwrite
	$(ZSL) index --features $(DEMO)/features/test --model $(DEMO)/models/devise --output $(DEMO)/index
	$(ZSL) search --index $(DEMO)/index "a striped animal with hooves" -k 8 --json > $(DEMO)/search_1.json
	$(ZSL) search --index $(DEMO)/index "an animal with a very long neck" -k 8 --json > $(DEMO)/search_2.json
	$(ZSL) search --index $(DEMO)/index "a small pet with whiskers" -k 8 --json > $(DEMO)/search_3.json
	$(ZSL) search --index $(DEMO)/index "a striped animal with hooves" -k 5
	@# open-vocabulary part: a ridge bridge fitted on captioned Open Clip Art drawings (Debian packages)
	@if [ -d $(OPENCLIPART) ]; then \
	  $(ZSL) corpus openclipart --output $(DEMO)/corpus --limit $(DEMO_CORPUS) && \
	  $(ZSL) extract --input $(DEMO)/corpus --output $(DEMO)/features/corpus && \
	  $(ZSL) embed-text --features $(DEMO)/features/corpus && \
	  $(ZSL) bridge --features $(DEMO)/features/corpus --exclude $(DEMO)/features/test --output $(DEMO)/models/bridge && \
	  $(ZSL) evaluate --model $(DEMO)/models/bridge --features $(DEMO)/features/test --classes $(DEMO)/classes --unseen conf/demo/split.json --json $(DEMO)/evaluation_bridge.json && \
	  $(ZSL) index --features $(DEMO)/features/corpus --model $(DEMO)/models/bridge --output $(DEMO)/index-corpus && \
	  echo "Open-vocabulary search of $(DEMO_CORPUS) drawings (images through the bridge, and their captions):" && \
	  $(ZSL) search --index $(DEMO)/index-corpus "a red car" -k 5 && \
	  $(ZSL) search --index $(DEMO)/index-corpus "a red car" -k 5 --mode both; \
	else echo "(no $(OPENCLIPART): apt-get install openclipart-png openclipart-svg for the open-vocabulary bridge part)"; fi
	$(ZSL) report --evaluation $(DEMO)/evaluation.json $$(test -f $(DEMO)/evaluation_bridge.json && echo --evaluation $(DEMO)/evaluation_bridge.json) \
		--search $(DEMO)/search_1.json --search $(DEMO)/search_2.json --search $(DEMO)/search_3.json \
		--title "zsl-pipeline demo: animal-mnist, 7 seen / 3 unseen" --output $(DEMO)/report.html
	@# the living pipeline (zsl run): day 1, then day 2 brings new images and a new class, day 3 nothing
	rm -rf $(DEMO)/living && mkdir -p $(DEMO)/living/images
	cp conf/demo/living/classes-day1.yaml $(DEMO)/living/classes.yaml
	for c in bear bird cow dog elephant giraffe horse sheep zebra; do mkdir -p $(DEMO)/living/images/$$c; \
	  ls $(DEMO)/data/train/$$c | head -n 50 | while read f; do cp $(DEMO)/data/train/$$c/$$f $(DEMO)/living/images/$$c/; done; done
	$(ZSL) run conf/demo/pipeline.yaml --no-progress
	@echo "day 2: 50 more images of each class, and a new class (cat) with its images"
	cp -r $(DEMO)/data/train/. $(DEMO)/living/images/ && cp conf/demo/classes.yaml $(DEMO)/living/classes.yaml
	$(ZSL) run conf/demo/pipeline.yaml --no-progress
	@echo "day 3: nothing new"
	$(ZSL) run conf/demo/pipeline.yaml --no-progress
	@echo ""
	@echo "The living pipeline's runs, each with its report (the label diff of day 2 with thumbnails): $(DEMO)/living/out/runs/index.html"
	@echo "Search the demo index in a browser:  $(ZSL) serve --index $(DEMO)/index --labels $(DEMO)/labels   then open http://127.0.0.1:8000/?q=a+striped+animal"
	@if [ -d $(DEMO)/index-corpus ]; then echo "... and the drawings too:  $(ZSL) serve --index animals=$(DEMO)/index --labels animals=$(DEMO)/labels --index drawings=$(DEMO)/index-corpus"; fi

test: install tools
	$(BIN)/python -m pytest -q

test-slow: install tools
	$(BIN)/python -m pytest -q -m slow

test-all: install tools
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: install
	$(BIN)/python -m benchmarks.bench --output benchmarks/results/results.json

# Not part of `make test`: ~30 min on 2 cores (4 sides x 3 repeats x 2 data sets of 5,000 images).
bench-extract: install
	$(BIN)/python -m benchmarks.bench_extract --output benchmarks/results/extract.json $(EXTRACT_ARGS)

# Not part of `make test`: ~25 min at 1M rows (writes 1M tiny images into tars under TMPDIR first).
PIPELINE_ROWS ?= 1000000
bench-pipeline: install
	$(BIN)/python -m benchmarks.bench_pipeline --rows $(PIPELINE_ROWS) --output benchmarks/results/pipeline.json

# Not part of `make test`: takes long at 1M rows (scratch data under TMPDIR, default /tmp; autofaiss in .venv-tools/autofaiss).
SCALE_ROWS ?= 100000 1000000
SCALE_MAX_MEMORY ?= 2G
SCALE_ARGS ?=
bench-scale: install
	$(BIN)/python -m benchmarks.bench_scale $(foreach n,$(SCALE_ROWS),--rows $(n)) --max-memory $(SCALE_MAX_MEMORY) \
		--output benchmarks/results/scale.json $(SCALE_ARGS)

eval: install
	$(BIN)/python -m benchmarks.eval_suite --out benchmarks/results

redo-share: install
	$(BIN)/python -m benchmarks.redo_share --json benchmarks/results/redo_share.json

clean:
	rm -rf runs

# GPU paths (CUDA encoder actors in fp16, faiss-gpu build/search); exits 2 without a CUDA GPU.
# What travels to a borrowed GPU machine (.device/, at most 64 MiB), then `bash infra/device/run-check.sh` there
device-check: install
	$(BIN)/python -m benchmarks.device_prepare --out .device

gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check --output benchmarks/results/gpu.json

# Load test of `zsl serve` on 127.0.0.1 (bounded in requests and seconds) -> benchmarks/results/serve.json
bench-serve: install
	$(BIN)/python -m benchmarks.bench_serve --output benchmarks/results/serve.json

# A refactor's "behaviour unchanged", measured: BASE's tree (a git worktree) and this one, alternating.
BASE ?= HEAD~1
COMPARE_REPEATS ?= 3
bench-compare: install
	$(BIN)/python -m benchmarks.compare_revisions --base $(BASE) --repeats $(COMPARE_REPEATS) \
		--output benchmarks/results/compare.json

# Label filters (issue 17): recall@10 and p99 per selectivity bucket, old post-filter vs new, one run
# per size (two label geometries each); FILTER_ROWS=1000000 writes filters_1m.json (~6 min, ~2 GB).
FILTER_ROWS ?= 200000
FILTER_OUT ?= benchmarks/results/$(if $(filter 1000000,$(FILTER_ROWS)),filters_1m,filters).json
bench-filters: install
	$(BIN)/python -m benchmarks.bench_filters --rows $(FILTER_ROWS) --output $(FILTER_OUT)

bench-reload: install
	$(BIN)/python -m benchmarks.bench_reload --output benchmarks/results/reload.json

# zsl label into an empty directory vs relabelling a finished output in place (with the label diff)
RELABEL_ROWS ?= 1000000
bench-relabel: install
	$(BIN)/python -m benchmarks.bench_relabel --rows $(RELABEL_ROWS) \
		--output benchmarks/results/relabel.json

bench-decode: install
	$(BIN)/python -m benchmarks.bench_decode_memory --output benchmarks/results/decode_memory.json
