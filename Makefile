# Mandate — developer entry points. `make demo` and `make test` are the README's two commands.
CARGO ?= cargo
BIN   := target/debug

.PHONY: build test demo bench lint fmt clean

build:
	$(CARGO) build --workspace --bins

# End-to-end tests in tests/ run the real binaries, so build them first; then every policy's Rego tests.
test: build
	$(CARGO) test --workspace --no-fail-fast
	$(BIN)/mandate policy test policies/reference policies/examples/*/

demo: build
	$(BIN)/mandate demo

bench:
	$(CARGO) build --release --workspace --bins
	target/release/mandate-bench --bin-dir target/release --report docs/benchmarks.md

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
