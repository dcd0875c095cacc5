"""deploy/ works on a real node: the DaemonSet mounts every path afxdpd uses at
the host's path, every manifest is valid for Kubernetes (offline schemas) or,
for CRDs and kustomize/kind files, structurally, the shipped configs load, and
the image's Containerfile and entrypoint do what the issue asks.

The expected paths come from afxdpd's argparse parser and the code's
constants, not from a list kept here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

import afxdp
from afxdp import config as afxdp_config
from afxdp import contracts, metrics
from afxdp.cli import afxdpd
from afxdp.cni import ethtool, netconf, shim
from afxdp.errors import ConfigError
from afxdp.metrics import parse_address, route
from afxdp.service import Paths

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
CNI_DATA_DIR = "/var/lib/cni"  # host-local's default dataDir is /var/lib/cni/networks
DEPLOY = ROOT / "deploy"
CAPABILITIES = DEPLOY / "capabilities"
KUSTOMIZATIONS = [DEPLOY, DEPLOY / "kind", CAPABILITIES]
DAEMONSETS = [DEPLOY / "daemonset.yaml", DEPLOY / "kind" / "daemonset.yaml",
              CAPABILITIES / "daemonset.yaml"]  # fmt: skip
# What an IPAM plugin run by afxdpd finds at the host's paths: host-local's
# leases, whereabouts' config dir, the dhcp daemon's socket dir.
IPAM_HOST_DIRS = {CNI_DATA_DIR: False, "/etc/cni/net.d": True, "/run/cni": True}  # -> readOnly
NOT_K8S = {"kustomization.yaml", "cluster.yaml"}  # kustomize's and kind's own files


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name not in NOT_K8S)


def daemonset(path: Path) -> dict[str, Any]:
    (ds,) = [d for d in docs(path) if d["kind"] == "DaemonSet"]
    return ds


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        if c["name"] == name:
            found: dict[str, Any] = c
            return found
    raise AssertionError(f"no container {name}")


def afxdpd_args(ds: dict[str, Any]) -> tuple[argparse.Namespace, list[str]]:
    c = container(ds["spec"]["template"]["spec"], "afxdpd")
    argv = [*c.get("command", []), *c.get("args", [])]
    assert argv[0] == "afxdpd", "the entrypoint dispatches on the first argument"
    return afxdpd.parser().parse_args(argv[1:]), argv[1:]


def dir_flags() -> dict[str, argparse.Action]:
    """afxdpd's directory flags: every Path-typed option but --config."""
    return {a.dest: a for a in afxdpd.parser()._actions if a.type is Path and a.dest != "config"}


def mounts(
    ds: dict[str, Any], name: str = "afxdpd"
) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """mountPath -> (volumeMount, volume) of a container."""
    spec = ds["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container(spec, name)["volumeMounts"]}


def host_mount(ds: dict[str, Any], path: str) -> dict[str, Any]:
    """The volumeMount at ``path``, asserting it is the host's ``path`` itself."""
    found = mounts(ds).get(path)
    assert found is not None, f"{path} is not mounted"
    mount, volume = found
    assert volume.get("hostPath", {}).get("path") == path, (
        f"{path} must be the host's {path} (kubelet, the runtime and CNI get host paths)"
    )
    return mount


# --- (a) the DaemonSet against afxdpd's flags and the code's paths ------------


@pytest.mark.parametrize("path", DAEMONSETS, ids=lambda p: str(p.relative_to(DEPLOY)))
class TestDaemonSetMounts:
    def test_every_directory_flag_is_passed_and_mounted_at_the_host_path(self, path: Path) -> None:
        ds = daemonset(path)
        args, argv = afxdpd_args(ds)
        flags = dir_flags()
        assert {"kubelet_dir", "uds_dir", "pin_dir", "run_dir", "log_dir"} <= flags.keys()
        for dest, action in flags.items():
            option = action.option_strings[0]
            assert any(a == option or a.startswith(option + "=") for a in argv), (
                f"{option} is not passed: a default that changes would move the path "
                "away from the mount"
            )
            # The manifest uses the code's defaults: the paths the docs name.
            assert getattr(args, dest) == action.default, option
            if dest == "kubelet_dir":
                continue  # its subdirectories are mounted, below
            if dest == "pin_dir" and args.no_pinned_maps:
                assert str(args.pin_dir) not in mounts(ds)  # nothing is pinned there
                continue
            host_mount(ds, str(getattr(args, dest)))

    def test_kubelet_sockets_dirs_are_mounted(self, path: Path) -> None:
        ds = daemonset(path)
        args, _ = afxdpd_args(ds)
        # Where the code looks: Registration uses <kubelet>/device-plugins, the
        # service connects to <kubelet>/pod-resources/kubelet.sock.
        registration = Path(args.kubelet_dir) / "device-plugins"
        service_source = (ROOT / "src/afxdp/service.py").read_text()
        assert '"pod-resources"' in service_source
        host_mount(ds, str(registration))
        assert not host_mount(ds, str(registration)).get("readOnly")
        host_mount(ds, str(Path(args.kubelet_dir) / "pod-resources"))

    def test_pin_dir_is_bidirectional_and_privileged_or_pinned_maps_are_refused(
        self, path: Path
    ) -> None:
        ds = daemonset(path)
        args, _ = afxdpd_args(ds)
        c = container(ds["spec"]["template"]["spec"], "afxdpd")
        if args.no_pinned_maps:  # the capabilities variant
            assert c["securityContext"]["privileged"] is False
            assert not any(m.get("mountPropagation") == "Bidirectional"
                           for m, _ in mounts(ds).values())  # fmt: skip
            return
        assert host_mount(ds, str(args.pin_dir)).get("mountPropagation") == "Bidirectional"
        assert c["securityContext"]["privileged"] is True  # Bidirectional requires it

    def test_run_dir_is_where_the_shim_looks(self, path: Path) -> None:
        args, _ = afxdpd_args(daemonset(path))
        assert Path(args.run_dir) in shim.DEFAULT_DIRS

    def test_pod_netns_dir_is_mounted_host_to_container(self, path: Path) -> None:
        ds = daemonset(path)
        mount = host_mount(ds, "/run/netns")
        assert mount.get("mountPropagation") == "HostToContainer"
        # CNI_NETNS may be /proc/<pid>/ns/net: the host's pids must be visible.
        assert ds["spec"]["template"]["spec"].get("hostPID") is True
        assert ds["spec"]["template"]["spec"].get("hostNetwork") is True

    def test_cni_bin_dir_is_read_only_at_the_path_the_shim_is_installed_to(
        self, path: Path
    ) -> None:
        ds = daemonset(path)
        spec = ds["spec"]["template"]["spec"]
        install = container(spec, "install-cni")
        argv = [*install.get("command", []), *install.get("args", [])]
        assert argv[:2] == ["afxdpctl", "install-cni"]
        target = argv[2]
        (volume_name,) = [m["name"] for m in install["volumeMounts"] if m["mountPath"] == target]
        volume = next(v for v in spec["volumes"] if v["name"] == volume_name)
        host_bin = volume["hostPath"]["path"]
        # afxdpd runs the IPAM plugins from CNI_PATH, the host's path.
        mount = host_mount(ds, host_bin)
        assert mount.get("readOnly") is True
        assert mount["name"] == volume_name

    def test_ipam_host_dirs_are_mounted(self, path: Path) -> None:
        # tests/test_ipam_paths.py runs real plugins in these mounts.
        for host_dir, read_only in IPAM_HOST_DIRS.items():
            assert bool(host_mount(daemonset(path), host_dir).get("readOnly")) is read_only

    def test_install_cni_is_unprivileged_and_bounded(self, path: Path) -> None:
        install = container(daemonset(path)["spec"]["template"]["spec"], "install-cni")
        # tests/test_capabilities.py installs the shim with no capability at all.
        assert install["securityContext"] == {
            "runAsUser": 0,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert set(install["resources"]) == {"requests", "limits"}
        for kind in ("requests", "limits"):
            assert set(install["resources"][kind]) == {"cpu", "memory"}

    def test_every_host_mount_is_at_its_host_path(self, path: Path) -> None:
        # Nothing is mounted elsewhere than the host keeps it (the install-cni
        # init container's /host/... target aside).
        for mount_path, (_, volume) in mounts(daemonset(path)).items():
            if "hostPath" in volume:
                assert volume["hostPath"]["path"] == mount_path

    def test_config_comes_from_the_configmap(self, path: Path) -> None:
        ds = daemonset(path)
        args, _ = afxdpd_args(ds)
        cfg = PurePosixPath(args.config)
        _, volume = mounts(ds)[str(cfg.parent)]
        assert volume["configMap"]["name"] == "afxdp-config"
        generated = {
            g["name"]: g["files"]
            for g in yaml.safe_load((path.parent / "kustomization.yaml").read_text())[
                "configMapGenerator"
            ]
        }
        assert cfg.name in generated["afxdp-config"]


@pytest.mark.parametrize("path", DAEMONSETS, ids=lambda p: str(p.relative_to(DEPLOY)))
class TestDaemonSetPolicy:
    def test_tolerates_noschedule_and_noexecute(self, path: Path) -> None:
        tolerations = daemonset(path)["spec"]["template"]["spec"]["tolerations"]
        for effect in ("NoSchedule", "NoExecute"):
            assert {"operator": "Exists", "effect": effect} in tolerations

    def test_rolling_update_one_at_a_time(self, path: Path) -> None:
        strategy = daemonset(path)["spec"]["updateStrategy"]
        assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}

    def test_scrape_annotations_name_the_metrics_endpoint(self, path: Path) -> None:
        ds = daemonset(path)
        args, _ = afxdpd_args(ds)
        notes = ds["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == parse_address(args.metrics_address)[1]
        assert serves_metrics(notes["prometheus.io/path"])

    def test_no_service_account_token(self, path: Path) -> None:
        ds = daemonset(path)
        assert ds["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
        # Nothing in afxdpd talks to the API server.
        src = ROOT / "src" / "afxdp"
        assert not any("serviceaccount" in p.read_text() for p in src.rglob("*.py")), (
            "something reads the token: mount it"
        )

    def test_images_are_the_package_version_not_latest(self, path: Path) -> None:
        spec = daemonset(path)["spec"]["template"]["spec"]
        for c in spec["containers"] + spec["initContainers"]:
            name, _, tag = c["image"].rpartition(":")
            assert tag == afxdp.__version__, c["name"]
            assert name.endswith("afxdp")
        kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
        for image in kustomization.get("images", []):
            assert image["newTag"] == afxdp.__version__

    def test_probes_reach_the_health_endpoints(self, path: Path) -> None:
        ds = daemonset(path)
        args, _ = afxdpd_args(ds)
        c = container(ds["spec"]["template"]["spec"], "afxdpd")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e for e in c.get("env", [])}
        host, port = parse_address(args.metrics_address)
        # kubelet probes the pod IP (the node's, with hostNetwork): afxdpd must
        # listen there, not on the default 127.0.0.1.
        if host.startswith("$("):
            var = host[2:-1]
            assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] in (
                "status.podIP",
                "status.hostIP",
            )
        else:
            assert host in ("0.0.0.0", "::")
        for probe, endpoint in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            assert get["path"] == endpoint
            assert ports.get(get["port"], get["port"]) == port
        # The endpoints exist: afxdpd's router answers them (not 404).
        for endpoint in ("/healthz", "/readyz"):
            reply = route(
                f"GET {endpoint} HTTP/1.1".encode(), metrics.Metrics.create(), lambda: (True, "")
            )
            assert not reply.startswith(b"HTTP/1.1 404"), endpoint

    def test_node_name_from_the_downward_api(self, path: Path) -> None:
        ds = daemonset(path)
        args, _ = afxdpd_args(ds)
        c = container(ds["spec"]["template"]["spec"], "afxdpd")
        env = {e["name"]: e for e in c["env"]}
        var = re.fullmatch(r"\$\((\w+)\)", args.node_name)
        assert var, "--node-name comes from the downward API"
        assert env[var.group(1)]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def _strip_kind_differences(ds: dict[str, Any]) -> dict[str, Any]:
    ds = json.loads(json.dumps(ds))
    spec = ds["spec"]["template"]["spec"]
    spec.pop("nodeSelector", None)
    for c in spec["containers"] + spec["initContainers"]:
        c.pop("imagePullPolicy", None)
    return ds


def test_kind_daemonset_differs_only_where_documented() -> None:
    base, kind = (daemonset(p) for p in DAEMONSETS[:2])
    assert _strip_kind_differences(base) == _strip_kind_differences(kind)
    spec = kind["spec"]["template"]["spec"]
    assert all(c["imagePullPolicy"] == "Never" for c in spec["containers"] + spec["initContainers"])
    cluster = yaml.safe_load((DEPLOY / "kind" / "cluster.yaml").read_text())
    assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    labelled = [
        n for n in cluster["nodes"] if spec["nodeSelector"].items() <= n.get("labels", {}).items()
    ]
    assert labelled, "no kind node matches the kind DaemonSet's nodeSelector"
    assert all(n["role"] == "worker" for n in labelled)


def _strip_capabilities_differences(ds: dict[str, Any]) -> dict[str, Any]:
    ds = json.loads(json.dumps(ds))
    spec = ds["spec"]["template"]["spec"]
    c = container(spec, "afxdpd")
    c.pop("securityContext")
    c["args"] = [a for a in c["args"] if a != "--no-pinned-maps"]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "pins"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "pins"]
    return ds


def test_capabilities_daemonset_differs_only_where_documented() -> None:
    base, capabilities = daemonset(DAEMONSETS[0]), daemonset(DAEMONSETS[2])
    assert _strip_capabilities_differences(base) == _strip_capabilities_differences(capabilities)
    for name in ("config.json", "network-attachment-definition.yaml"):
        assert (CAPABILITIES / name).read_text() == (DEPLOY / name).read_text(), name


def test_capabilities_config_has_no_pinned_map_pool() -> None:
    loaded = afxdp_config.load_config((CAPABILITIES / "config.json").read_bytes())
    afxdp_config.refuse_pinned_maps(loaded.config)  # what afxdpd --no-pinned-maps does
    pinned = afxdp_config.load_config((DEPLOY / "examples" / "config-pinned.json").read_bytes())
    with pytest.raises(ConfigError, match="bpfMapPinningEnable"):
        afxdp_config.refuse_pinned_maps(pinned.config)


# --- (b) every manifest validates --------------------------------------------


@pytest.mark.parametrize("path", all_manifests(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_validates(path: Path) -> None:
    for doc in docs(path):
        if doc["kind"] == "NetworkAttachmentDefinition":
            check_nad(doc)
        elif doc["kind"] == "ServiceMonitor":
            check_servicemonitor(doc)
        else:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_validation_catches_a_bad_manifest() -> None:
    ds = daemonset(DAEMONSETS[0])
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def pools_of_shipped_configs() -> set[str]:
    names = set()
    for cfg in shipped_configs():
        names |= {p.name for p in afxdp_config.load_config(cfg.read_bytes()).config.pools}
    return names


def check_nad(doc: dict[str, Any]) -> None:
    """A NetworkAttachmentDefinition (a CRD: no schema here) checked as afxdpd will."""
    assert doc["apiVersion"] == "k8s.cni.cncf.io/v1"
    name = doc["metadata"]["name"]
    resource = doc["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"]
    prefix, _, pool = resource.partition("/")
    assert prefix == "afxdp" and pool in pools_of_shipped_configs(), resource
    assert set(doc["spec"]) == {"config"}
    conf = json.loads(doc["spec"]["config"])
    assert conf["type"] == shim.NAME and conf["name"] == name
    # As the CNI handler parses it (GC: no deviceID needed), then the ethtool
    # commands as they would run on a device.
    parsed = netconf.parse_netconf(doc["spec"]["config"].encode(), "GC")
    assert parsed.ipam_type == "host-local"
    ethtool.render(parsed.ethtool_cmds, "ens1f0", "192.0.2.10")


def serves_metrics(path: str) -> bool:
    """afxdpd's router answers GET ``path`` with the Prometheus exposition."""
    reply = route(f"GET {path} HTTP/1.1".encode(), metrics.Metrics.create(), lambda: (True, ""))
    return reply.startswith(b"HTTP/1.1 200") and metrics.CONTENT_TYPE.encode() in reply


# The fields of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1)
# that the example may use: a CRD, no schema offline, so a misspelt field is caught here.
SERVICEMONITOR_SPEC = {"selector", "namespaceSelector", "endpoints", "jobLabel"}
SERVICEMONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
RELABELING = {"sourceLabels", "targetLabel", "action", "regex", "replacement", "separator"}


def check_servicemonitor(doc: dict[str, Any]) -> None:
    """A ServiceMonitor (a CRD: no schema here) checked field by field."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= SERVICEMONITOR_SPEC, set(spec) - SERVICEMONITOR_SPEC
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"}
    assert set(spec["namespaceSelector"]) <= {"matchNames", "any"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICEMONITOR_ENDPOINT, set(endpoint) - SERVICEMONITOR_ENDPOINT
        for rule in endpoint.get("relabelings", []):
            assert set(rule) <= RELABELING, set(rule) - RELABELING


def test_the_servicemonitor_example_scrapes_every_afxdpd_on_its_metrics_port() -> None:
    found = docs(DEPLOY / "examples" / "servicemonitor.yaml")
    (service,) = [d for d in found if d["kind"] == "Service"]
    (monitor,) = [d for d in found if d["kind"] == "ServiceMonitor"]
    ds = daemonset(DAEMONSETS[0])
    args, _ = afxdpd_args(ds)
    template = ds["spec"]["template"]
    afxdpd_c = container(template["spec"], "afxdpd")
    # The Service selects the DaemonSet's pods, headless, in their namespace.
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    # The ServiceMonitor selects that Service, in that namespace.
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    # Its endpoint: the Service's port, which reaches afxdpd's metrics port.
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in afxdpd_c["ports"]}
    metrics_port = parse_address(args.metrics_address)[1]
    (endpoint,) = monitor["spec"]["endpoints"]
    target = ports[endpoint["port"]]["targetPort"]
    assert container_ports.get(target, target) == metrics_port
    assert ports[endpoint["port"]]["port"] == metrics_port
    assert serves_metrics(endpoint["path"])


def test_servicemonitor_check_catches_a_misspelt_field() -> None:
    (monitor,) = [d for d in docs(DEPLOY / "examples" / "servicemonitor.yaml")
                  if d["kind"] == "ServiceMonitor"]  # fmt: skip
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(AssertionError, match="intervall"):
        check_servicemonitor(monitor)


def test_nad_check_catches_a_bad_ethtool_command() -> None:
    (nad,) = docs(DEPLOY / "network-attachment-definition.yaml")
    conf = json.loads(nad["spec"]["config"])
    conf["ethtoolCmds"] = ["-s -device- speed 10"]  # not undoable: refused
    nad["spec"]["config"] = json.dumps(conf)
    with pytest.raises(Exception, match="ethtoolCmds"):
        check_nad(nad)


def test_example_pods_ask_for_a_pool_and_its_network() -> None:
    nads = {
        d["metadata"]["name"]: d["metadata"]["annotations"]["k8s.v1.cni.cncf.io/resourceName"]
        for p in all_manifests()
        for d in docs(p)
        if d["kind"] == "NetworkAttachmentDefinition"
    }
    pods = [d for p in sorted((DEPLOY / "examples").glob("pod-*.yaml")) for d in docs(p)]
    assert len(pods) >= 3
    for pod in pods:
        network = pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"]
        (c,) = pod["spec"]["containers"]
        requested = {k for k in c["resources"]["limits"] if k.startswith("afxdp/")}
        assert requested == {nads[network]}, pod["metadata"]["name"]
        pool = nads[network].partition("/")[2]
        script = " ".join(c.get("command", []) + c.get("args", []))
        # The pod finds its device through the env var the device plugin sets.
        assert f"AFXDP_DEVICES_{pool.upper()}" in script


def test_dpdk_examples_use_the_pod_paths() -> None:
    cni = (DEPLOY / "examples" / "pod-dpdk-testpmd.yaml").read_text()
    assert "use_cni=1" in cni
    assert f"dp_path={contracts.POD_DIR}/$dev/{contracts.SOCKET_NAME}" in cni
    pinned = (DEPLOY / "examples" / "pod-pinned-map.yaml").read_text()
    assert f"dp_path={contracts.POD_DIR}/$dev/{contracts.MAP_NAME}" in pinned


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("root", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomize_build_validates(root: Path) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(root)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == ["ConfigMap", "DaemonSet", "NetworkAttachmentDefinition", "ServiceAccount"]
    for doc in rendered:
        if doc["kind"] == "NetworkAttachmentDefinition":
            check_nad(doc)
            continue
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        if doc["kind"] == "ConfigMap":
            afxdp_config.load_config(doc["data"]["config.json"])


def test_the_daemonset_runs_only_on_the_architecture_the_image_is_built_for() -> None:
    # scripts/build-image builds amd64 only (the CI machine's): the shim in it is
    # a native x86-64 program, which other nodes would fail to run.
    spec = daemonset(DAEMONSETS[0])["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "amd64"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_an_overlay_points_every_container_at_a_registry(tmp_path: Path) -> None:
    """What README "Installing" shows: the image reference is kustomize's to set."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(DEPLOY, overlay)],
            "images": [{"name": "afxdp", "newName": "registry.example.com/net/afxdp"}],
        })
    )  # fmt: skip
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor=LoadRestrictionsNone",
                          str(overlay)], capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    (ds,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    # The registry from the overlay, the tag (the version) from deploy/kustomization.yaml.
    assert images == {f"registry.example.com/net/afxdp:{afxdp.__version__}"}


# --- (c) the configs ----------------------------------------------------------


def shipped_configs() -> list[Path]:
    files = []
    for root in KUSTOMIZATIONS:
        k = yaml.safe_load((root / "kustomization.yaml").read_text())
        for gen in k.get("configMapGenerator", []):
            files += [root / f.rpartition("=")[2] for f in gen["files"]]
    return files + sorted((DEPLOY / "examples").glob("config-*.json"))


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_shipped_config_is_valid(path: Path) -> None:
    loaded = afxdp_config.load_config(path.read_bytes())
    assert not loaded.warnings


def test_kind_config_is_kind_mode() -> None:
    cfg = afxdp_config.load_config((DEPLOY / "kind" / "config.json").read_bytes()).config
    assert cfg.kind_cluster and len(cfg.pools) == 1


def test_image_ships_the_config_the_daemonset_points_at() -> None:
    text = (ROOT / "Containerfile").read_text()
    args, _ = afxdpd_args(daemonset(DAEMONSETS[0]))
    assert re.search(rf"^COPY deploy/config.json {re.escape(str(args.config))}$", text, re.M)


# --- the image ---------------------------------------------------------------


def stages(text: str) -> list[str]:
    return re.split(r"^FROM ", text, flags=re.M)[1:]


def test_containerfile() -> None:
    text = (ROOT / "Containerfile").read_text()
    head = re.split(r"^FROM ", text, flags=re.M)[0]
    assert re.search(r"^ARG BASE_IMAGE=", head, re.M), "the base image is a build arg"
    build, runtime = stages(text)
    assert build.startswith("${BASE_IMAGE} AS build") and runtime.startswith("${BASE_IMAGE}")
    for stage in (build, runtime):
        for run in re.findall(r"^RUN .*?(?<!\\)$", stage, re.M | re.S):
            if "apt-get install" in run:
                assert "apt-get clean" in run and "rm -rf /var/lib/apt/lists" in run
    assert not re.search(r"pip|setuptools", re.sub(r"#.*", "", runtime).replace("pipe", "")), (
        "no pip or setuptools in the runtime stage"
    )
    assert "COPY --from=build /opt/afxdp /opt/afxdp" in runtime
    # Every OCI label (the build args behind them: tests/test_packaging.py).
    labels = dict(re.findall(r'org\.opencontainers\.image\.([a-z.]+)="([^"]*)"', runtime))
    assert set(labels) == {"title", "description", "version", "created", "revision", "source",
                           "url", "licenses", "base.name", "base.digest"}  # fmt: skip
    assert labels["title"] == "afxdp"
    assert 'ENTRYPOINT ["/usr/local/bin/afxdp-entrypoint"]' in runtime
    license_label = re.search(r'org.opencontainers.image.licenses="([^"]+)"', runtime)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert license_label and f'license = "{license_label.group(1)}"' in pyproject


def test_containerignore_keeps_what_the_build_needs() -> None:
    ignore = (ROOT / ".containerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[ignore.index("*")] == "*"  # an allowlist
    for needed in ("pyproject.toml", "hatch_build.py", "README.md", "LICENSE", "src", "cni_shim"):
        assert needed in kept
    for copied in re.findall(r"^COPY (?!--)(\S+) ", (ROOT / "Containerfile").read_text(), re.M):
        if copied != ".":
            assert copied.rstrip("/") in kept or str(Path(copied).parent) in kept, copied


@pytest.fixture
def fake_programs(tmp_path: Path) -> dict[str, str]:
    """A PATH where afxdpd, afxdpctl and python print their name and arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("afxdpd", "afxdpctl", "python"):
        prog = bin_dir / name
        prog.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        prog.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "afxdpd --config /etc/afxdp/config.json"),
        (["--node-name=n1", "--config=/c.json"], "afxdpd --node-name=n1 --config=/c.json"),
        (["afxdpd", "--help"], "afxdpd --help"),
        (
            ["afxdpctl", "install-cni", "/host/opt/cni/bin"],
            "afxdpctl install-cni /host/opt/cni/bin",
        ),
        (["python", "-c", "x"], "python -c x"),
    ],
)
def test_entrypoint_dispatches(
    argv: list[str], expected: str, fake_programs: dict[str, str]
) -> None:
    done = subprocess.run(
        ["sh", str(DEPLOY / "image" / "entrypoint"), *argv],
        env=fake_programs,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert done.stdout.strip() == expected


def test_entrypoint_default_is_the_images_config() -> None:
    entry = (DEPLOY / "image" / "entrypoint").read_text()
    text = (ROOT / "Containerfile").read_text()
    (shipped,) = re.findall(r"^COPY deploy/config.json (\S+)$", text, re.M)
    assert f"--config {shipped}" in entry


# --- packaging ----------------------------------------------------------------


def test_license_matches_the_declared_license() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a stub
    assert len(text.split()) > 1500


def test_paths_defaults_are_what_the_parser_shows() -> None:
    # Guards the derivation above: the parser's defaults are the service's.
    flags = dir_flags()
    d = Paths()
    for dest in ("kubelet_dir", "uds_dir", "pin_dir", "run_dir"):
        assert flags[dest].default == getattr(d, dest)
