# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need (the first time takes a few minutes:
# torch is large).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LS     := $(VENV)/bin/lineside
STAMP  := $(VENV)/.installed
DEMO   ?= demo-out

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,export,dev,opcua,modbus,signing]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	rm -rf $(DEMO)
	$(LS) data synth $(DEMO)/data --per-class 40 --size 128 --seed 0
	$(LS) data synth $(DEMO)/test --per-class 20 --size 128 --seed 1
	$(LS) train $(DEMO)/data --out $(DEMO)/run --image-size 128
	$(LS) eval $(DEMO)/run $(DEMO)/test
	$(LS) predict $(DEMO)/run $(DEMO)/test/hat/hat_0000.png $(DEMO)/test/screw/screw_0000.png $(DEMO)/test/card/card_0000.png
	$(LS) export $(DEMO)/run --out $(DEMO)/bundle --eval $(DEMO)/test --quiet
	$(LS) eval $(DEMO)/bundle $(DEMO)/test --backend openvino --precision int8 --quiet
	$(LS) eval $(DEMO)/bundle $(DEMO)/test --backend onnxruntime --quiet
	$(LS) data video $(DEMO)/test $(DEMO)/parts.avi --hold 3
	$(LS) devices probe
	@if $(PY) -c "import socket; socket.create_connection(('127.0.0.1', 1883), 1)" 2>/dev/null; then \
		echo "an MQTT broker listens on 127.0.0.1:1883: the run publishes to lineside/demo/# (mosquitto_sub -v -t 'lineside/demo/#')"; \
		MQTT="--mqtt mqtt://127.0.0.1:1883/lineside/demo --station demo"; \
	else \
		echo "no MQTT broker on 127.0.0.1:1883, so the run publishes nothing (start mosquitto to watch the decisions)"; \
		MQTT=""; \
	fi; \
	$(LS) run $(DEMO)/bundle --profile auto --source $(DEMO)/parts.avi --pace 30 --roi 80,0,480,480 --vote 2/3 --quiet \
		--log $(DEMO)/decisions.sqlite --save $(DEMO)/review --save-when all --save-max-files 60 --reject-below 0.5 $$MQTT
	$(LS) data synth $(DEMO)/cards --defects card --per-class 40 --size 128 --seed 0
	$(LS) data synth $(DEMO)/cards-test --defects card --per-class 20 --size 128 --seed 1
	$(LS) train $(DEMO)/cards --task anomaly --out $(DEMO)/cards-run --quiet
	$(LS) eval $(DEMO)/cards-run $(DEMO)/cards-test --out $(DEMO)/cards-eval --quiet
	@echo "review the last 60 frames the run saved (open http://127.0.0.1:8080/review; add --http-token-file FILE to relabel):"
	@echo "  $(LS) review $(DEMO)/decisions.sqlite --save $(DEMO)/review"

bench: $(STAMP)
	$(PY) benchmarks/fewshot.py ../shared/datasets/neu-det --shots 5,10,20 --repeats 3

clean:
	rm -rf $(DEMO) .pytest_cache
