# The two commands of the README. Each installs what it needs first.
.PHONY: test demo demo-podman bootstrap bench

bootstrap:
	./scripts/bootstrap

# The whole test suite: lint, type check, unit and privileged tests.
test: bootstrap
	.venv/bin/nox

# The main job on this machine, no Kubernetes needed (root): two veth "NICs",
# afxdpd, a stand-in kubelet (afxdp.devnode) and two pods that receive frames
# over AF_XDP. Under a minute; leaves nothing behind, also after Ctrl-C.
demo: bootstrap
	.venv/bin/python -m afxdp.demo

# The same with each pod as a real podman container on a CNI network whose
# plugin is the afxdp shim.
demo-podman: bootstrap
	.venv/bin/python -m afxdp.demo --podman

bench: bootstrap
	.venv/bin/nox -s bench
