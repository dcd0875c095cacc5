# The two commands of the README. Each installs what it needs first.
.PHONY: test demo bootstrap bench

bootstrap:
	./scripts/bootstrap

# The whole test suite: lint, type check, unit and privileged tests.
test: bootstrap
	.venv/bin/nox

# The main job: validate the shipped config, then a dry-run discovery of this node.
demo: bootstrap
	.venv/bin/afxdpctl config validate deploy/config.json
	.venv/bin/afxdpctl discover --config deploy/config.json

bench: bootstrap
	.venv/bin/nox -s bench
