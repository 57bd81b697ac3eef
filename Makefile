# The two commands of the README:
#   make demo   plays one job end to end on the local stack
#   make test   runs the test suite
# Both install what is missing first (infra/bootstrap): the demo only what it needs, the tests
# everything. Anything that joins a LiveKit room runs in a private network namespace
# (infra/netns-run): libwebrtc ignores loopback.
.PHONY: demo test test-fast test-sdk12 bootstrap bootstrap-demo lint bench example-agent

bootstrap:
	@bash infra/bootstrap test

bootstrap-demo:
	@bash infra/bootstrap demo

demo: bootstrap-demo
	infra/netns-run .venv/bin/avatarq demo

test: bootstrap
	infra/netns-run .venv/bin/python -m pytest -q -rs $(PYTEST_ARGS)

# The inner loop: everything that needs neither the network namespace nor real waiting time
# (the state machine on fakes, the ledger on a real Redis, producers, API, settings).
test-fast: bootstrap
	.venv/bin/python -m pytest -q -n auto -m "not netns and not slow" $(PYTEST_ARGS)

# The SDK-sensitive tests again on livekit 1.2.x (.venv-lk12, infra/bootstrap-sdk12): the
# per-room FFI routing, the pipeline end to end, the avatar's fidelity, room holds and the
# fault lab. The avatar emulator runs from .venv: livekit-agents pins livekit 1.1.21
# (docs/compatibility.md).
SDK12_TESTS = tests/test_ffiroute.py tests/test_pipeline_e2e.py tests/test_fidelity.py \
	tests/test_roomhold.py tests/test_faults.py
test-sdk12: bootstrap
	@bash infra/bootstrap-sdk12
	AVATARQ_DEV_EMULATOR_PYTHON=$(CURDIR)/.venv/bin/python \
		infra/netns-run .venv-lk12/bin/python -m pytest -q -rs $(SDK12_TESTS) $(PYTEST_ARGS)

lint: bootstrap
	.venv/bin/ruff check avatarq avatarq_cli avatarq_agents producers tasks devstack tests bench examples
	.venv/bin/ruff format --check avatarq avatarq_cli avatarq_agents producers tasks devstack tests bench examples
	.venv/bin/mypy avatarq avatarq_cli avatarq_agents producers tasks devstack/avatarq_dev examples

# The livekit-agents example (examples/agent_announcer.py) once on the local stack.
example-agent: bootstrap
	infra/netns-run .venv/bin/python examples/agent_announcer.py local
