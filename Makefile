# Beacon build and test entry points. `make test` is what CI runs.
GO          ?= go
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X main.version=$(VERSION)
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
FUZZTIME    ?= 30s

# Debian packages the tests drive as real third-party parts: command -> package.
TEST_TOOLS := mosquitto_sub:mosquitto-clients mosquitto_pub:mosquitto-clients stdbuf:coreutils \
	chromium:chromium npm:npm mosquitto:mosquitto openssl:openssl script:bsdutils redis-server:redis-server
# MQTT.js for the browser test, from the npm registry (cmd/beacon/testdata/node/package.json).
MQTTJS := cmd/beacon/testdata/node/node_modules/mqtt/dist/mqtt.min.js

.PHONY: all build test test-deps lint bench bench-compare fuzz clean

all: build

# The broker, and the load generator (its own binary: the broker links none of it).
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/beacon ./cmd/beacon
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o bin/beacon-bench ./cmd/beacon-bench

# Installs whatever test tool is missing: apt-get update once, then the packages.
test-deps:
	@missing=""; \
	for t in $(TEST_TOOLS); do \
		command -v "$${t%%:*}" >/dev/null 2>&1 || missing="$$missing $${t#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		echo "installing test tools:$$missing"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@[ -f $(MQTTJS) ] || (cd cmd/beacon/testdata/node && npm install --no-audit --no-fund --no-package-lock --silent)

test: test-deps
	$(GO) vet ./...
	@unformatted="$$(gofmt -l .)"; if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) test -race -count=1 -timeout 20m ./...

lint:
	$(GO) vet ./...
	@unformatted="$$(gofmt -l .)"; if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) run $(STATICCHECK) ./...

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

# Beacon against Mosquitto, side by side on this machine (docs/BENCHMARKS.md).
bench-compare: build
	@command -v mosquitto >/dev/null 2>&1 || { sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends mosquitto; }
	bin/beacon-bench compare --reps 3 --beacon bin/beacon

fuzz:
	$(GO) test ./storage -run '^$$' -fuzz FuzzDecodeMessage -fuzztime $(FUZZTIME)
	$(GO) test ./broker -run '^$$' -fuzz FuzzLoad -fuzztime $(FUZZTIME)
	$(GO) test ./broker -run '^$$' -fuzz FuzzConnection -fuzztime $(FUZZTIME)
	$(GO) test ./broker/engine -run '^$$' -fuzz FuzzConnection -fuzztime $(FUZZTIME)
	$(GO) test ./devices -run '^$$' -fuzz FuzzMatchesCovers -fuzztime $(FUZZTIME)
	$(GO) test ./devices -run '^$$' -fuzz FuzzParseRules -fuzztime $(FUZZTIME)
	$(GO) test ./devices/codec -run '^$$' -fuzz FuzzPacked -fuzztime $(FUZZTIME)
	$(GO) test ./devices/codec -run '^$$' -fuzz FuzzJSON -fuzztime $(FUZZTIME)
	$(GO) test ./devices/codec -run '^$$' -fuzz FuzzCBOR -fuzztime $(FUZZTIME)

clean:
	rm -rf bin
