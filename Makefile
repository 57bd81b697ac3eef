# The two commands of the README:
#   make demo   plays one job end to end on the local stack
#   make test   runs the test suite
# Both install what is missing first (infra/bootstrap): the demo only what it needs, the tests
# everything. Anything that joins a LiveKit room runs in a private network namespace
# (infra/netns-run): libwebrtc ignores loopback.
.PHONY: demo test test-fast bootstrap bootstrap-demo lint bench example-agent

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

lint: bootstrap
	.venv/bin/ruff check avatarq avatarq_cli avatarq_agents producers tasks devstack tests bench examples
	.venv/bin/ruff format --check avatarq avatarq_cli avatarq_agents producers tasks devstack tests bench examples
	.venv/bin/mypy avatarq avatarq_cli avatarq_agents producers tasks devstack/avatarq_dev examples

# The livekit-agents example (examples/agent_announcer.py) once on the local stack.
example-agent: bootstrap
	infra/netns-run .venv/bin/python examples/agent_announcer.py local
