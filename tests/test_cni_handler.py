"""The CNI handler's semantics, driven directly (no shim, no socket) on real
links: real netns and veth, real host-local IPAM, real ethtool.

The device side is a FAKE (``FakeDeviceSide``): the real one (the Service) is
exercised through the shim in test_cni.py; here the tests must see each call
the handler makes across that protocol and set readiness and failures.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from afxdp.cni import ethtool
from afxdp.cni.attachments import Attachment, AttachmentStore
from afxdp.cni.errors import CniError
from afxdp.cni.frame import Request
from afxdp.cni.handler import CniHandler
from afxdp.errors import DeviceError
from afxdp.netdev import NetDev
from tests.kernel import Lab, ip

HOST_LOCAL_DIR = "/usr/lib/cni"
SUBNET = "10.79.0"


class FakeDeviceSide:
    """FAKE DeviceSide: records what the handler tells the device side."""

    def __init__(self, devices: list[str]) -> None:
        self.ready = True
        self.allocated: dict[str, bool] = dict.fromkeys(devices, True)
        self.came_home_calls: list[tuple[str, bool]] = []
        self.broken = False  # device_allocated raises: a bug on the device side
        self.ensured: list[str] = []  # devices whose program was made sure of
        self.programless: set[str] = set()  # devices whose program cannot be put back
        self.unknown: set[str] = set()  # devices whose holder kubelet has not said yet
        self.attached: list[tuple[str, str]] = []  # (device, pod) each ADD named

    def device_allocated(self, device: str) -> bool | None:
        if self.broken:
            raise RuntimeError("device side bug")
        if device in self.unknown:
            raise DeviceError("who holds it is not known yet (fake)")
        return self.allocated.get(device)

    async def came_home(self, device: str, keep_xdp: bool) -> None:
        self.came_home_calls.append((device, keep_xdp))
        if self.broken:
            raise RuntimeError("device side bug")

    def describe(self, device: str) -> dict[str, Any]:
        described: dict[str, Any] = msgspec.to_builtins(NetDev(name=device, ifindex=1,
                                                               driver="veth"))  # fmt: skip
        return described

    async def ensure_program(self, device: str) -> None:
        self.ensured.append(device)
        if device in self.programless:
            raise DeviceError(f"{device}: another XDP program (id 7) is attached (fake)")

    def pod_attached(self, device: str, pod: str) -> None:
        self.attached.append((device, pod))


class FakeIpam:
    """FAKE IPAM plugin ``fakeipam``: the real host-local, except that it fails
    or holds (until released) as the test says, through files in ``ctl``:
    ``fail-ADD``/``fail-DEL``, ``hold-<container>`` (ADD), ``hold-DEL-<container>``;
    ``see-ADD`` (``NS DEV``: ADD waits until DEV is in netns NS) and ``see-DEL``
    (``DEV``: DEL waits until DEV is in the host netns), giving up after 10 s
    (code 5), before anything else. Each call is logged to ``ctl/log``."""

    def __init__(self, tmp: Path) -> None:
        self.bin = tmp / "fake-cni-bin"
        self.ctl = tmp / "fake-ipam-ctl"
        self.bin.mkdir()
        self.ctl.mkdir()
        script = self.bin / "fakeipam"
        c = self.ctl
        script.write_text(f"""#!/bin/sh
echo "$CNI_COMMAND $CNI_CONTAINERID" >> {c}/log
see() {{  # wait until the link is there, or give up
  n=0
  until ip $1 link show $2 >/dev/null 2>&1; do
    n=$((n+1)); [ $n -gt 500 ] || {{ sleep 0.02; continue; }}
    echo '{{"cniVersion":"1.0.0","code":5,"msg":"fake IPAM never saw '$2'"}}'; exit 1
  done
}}
if [ "$CNI_COMMAND" = ADD ] && [ -e {c}/see-ADD ]; then
  read ns dev < {c}/see-ADD; see "-n $ns" $dev
fi
if [ "$CNI_COMMAND" = DEL ] && [ -e {c}/see-DEL ]; then
  read dev < {c}/see-DEL; see "" $dev
fi
for verb in ADD DEL; do
  if [ "$CNI_COMMAND" = "$verb" ] && [ -e {c}/fail-$verb ]; then
    echo '{{"cniVersion":"1.0.0","code":11,"msg":"fake IPAM refuses '$verb'"}}'; exit 1
  fi
done
if [ "$CNI_COMMAND" = ADD ] && [ -e {c}/hold-$CNI_CONTAINERID ]; then
  touch {c}/entered-$CNI_CONTAINERID
  while [ -e {c}/hold-$CNI_CONTAINERID ]; do sleep 0.02; done
fi
if [ "$CNI_COMMAND" = DEL ] && [ -e {c}/hold-DEL-$CNI_CONTAINERID ]; then
  touch {c}/entered-DEL-$CNI_CONTAINERID
  while [ -e {c}/hold-DEL-$CNI_CONTAINERID ]; do sleep 0.02; done
fi
exec {HOST_LOCAL_DIR}/host-local
""")
        script.chmod(0o755)

    def set(self, flag: str, on: bool = True) -> None:
        (self.ctl / flag).touch() if on else (self.ctl / flag).unlink(missing_ok=True)

    def see(self, verb: str, text: str | None) -> None:
        """``see-<verb>`` with ``text`` (None removes it)."""
        f = self.ctl / f"see-{verb}"
        f.write_text(text + "\n") if text is not None else f.unlink(missing_ok=True)

    def calls(self) -> list[str]:
        f = self.ctl / "log"
        lines = f.read_text().splitlines() if f.exists() else []
        return [c for c in lines if not c.startswith("VERSION")]  # ADD, DEL, CHECK

    def release_all(self) -> None:
        for f in self.ctl.glob("hold-*"):
            f.unlink(missing_ok=True)

    async def wait_entered(self, container: str, deadline: float = 10.0) -> None:
        with anyio.fail_after(deadline):
            while not (self.ctl / f"entered-{container}").exists():
                await anyio.sleep(0.01)


class Setup:
    def __init__(self, tmp: Path, lab: Lab, devices: list[str]) -> None:
        self.tmp, self.lab, self.devices = tmp, lab, devices
        self.ipam_dir = tmp / "ipam"
        self.ipam = FakeIpam(tmp)
        self.side = FakeDeviceSide(devices)
        self.store_path = tmp / "run" / "cni-attachments.json"
        self.handler = CniHandler(self.side, AttachmentStore(self.store_path))

    def netconf(self, dev: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": version, "name": "afxdp-net", "type": "afxdp", "mode": "primary",
            "deviceID": dev,
            "ipam": {"type": "fakeipam", "dataDir": str(self.ipam_dir),
                     "ranges": [[{"subnet": f"{SUBNET}.0/24", "gateway": f"{SUBNET}.1"}]],
                     "routes": [{"dst": "0.0.0.0/0"}]},
        }  # fmt: skip
        conf.update(extra)
        return conf

    async def call(self, command: str, conf: dict[str, Any], *, netns: str = "",
                   container: str = "ctr1", ifname: str = "net1",
                   args: str = "") -> tuple[int, Any]:  # fmt: skip
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns,
               "CNI_IFNAME": ifname, "CNI_PATH": f"{self.ipam.bin}:{HOST_LOCAL_DIR}",
               "CNI_ARGS": args}  # fmt: skip
        code, out, _ = await self.handler.handle(Request(env, json.dumps(conf).encode()))
        return code, json.loads(out) if out.strip() else None

    def leases(self) -> set[str]:
        d = self.ipam_dir / "afxdp-net"
        return {p.name for p in d.iterdir() if p.name.startswith(SUBNET)} if d.exists() else set()


@pytest.fixture
def setup(tmp_path: Path, lab: Lab) -> Iterator[Setup]:
    devices = []
    for i in range(3):
        a, b = lab.veth(lab.name(f"ch{i}"), lab.name(f"cp{i}"), queues=4)
        ip("link", "set", a, "up")
        ip("link", "set", b, "up")
        devices.append(a)
    s = Setup(tmp_path, lab, devices)
    try:
        yield s
    finally:
        s.ipam.release_all()  # no fake plugin is left waiting


def features(dev: str, netns: str | None = None) -> str:
    cmd = ["ethtool", "-k", dev]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def channels(dev: str) -> dict[str, str]:
    out = subprocess.run(["ethtool", "-l", dev], capture_output=True, text=True, check=True)
    return ethtool.parse_settings(out.stdout)


def in_host(dev: str) -> bool:
    done = subprocess.run(["ip", "link", "show", dev], capture_output=True, check=False)
    return done.returncode == 0


def in_pod(ns: str, dev: str) -> bool:
    done = subprocess.run(["ip", "-n", ns, "link", "show", dev], capture_output=True, check=False)
    return done.returncode == 0


# ethtool's parsers and refusals (no kernel)


def test_features_parse_to_settable_leaves_with_requested_values() -> None:
    text = ("Features for x:\nrx-checksumming: on [fixed]\ntx-checksumming: off\n"
            "\ttx-checksum-ipv4: off [fixed]\n\ttx-checksum-ip-generic: off\n"
            "tcp-segmentation-offload: off\n\ttx-tcp-segmentation: off [requested on]\n"
            "generic-segmentation-offload: on\n")  # fmt: skip
    assert ethtool.parse_features(text) == {
        "rx-checksumming": ("on", True),
        "tx-checksum-ipv4": ("off", True),
        "tx-checksum-ip-generic": ("off", False),
        "tx-tcp-segmentation": ("on", False),  # what was asked, not what the kernel allows now
        "generic-segmentation-offload": ("on", False),
    }  # the groups (tx-checksumming, tcp-segmentation-offload) are not settings


def test_settings_rule_ids_and_flow_hash_parse() -> None:
    text = ("Channel parameters for x:\nPre-set maximums:\nRX:\t\t4\nTX:\t\t4\nOther:\t\tn/a\n"
            "Current hardware settings:\nRX:\t\t2\nTX:\t\t4\nOther:\t\tn/a\nRX Jumbo:\t0\n")  # fmt: skip
    assert ethtool.parse_settings(text) == {"rx": "2", "tx": "4", "rx-jumbo": "0"}
    rules = ethtool.Change("rules", "x").after("Added rule with ID 1023\n")
    assert rules.rules == (1023,)
    hashed = (
        "UDP over IPV4 flows use these fields:\nIP SA\nIP DA\nL4 bytes 2 & 3 [TCP/UDP dst port]"
    )
    assert ethtool.parse_flow_hash(hashed) == "sdn"


@pytest.mark.parametrize(
    ("cmd", "text"),
    [("-f -device- fw.bin", "cannot be undone"), ("-K eth9 tx off", "must name the pod's device"),
     ("-N -device- delete 5", "deleting a rule"), ("-K -device-", "must name the pod's device")],
)  # fmt: skip
def test_ethtool_commands_that_cannot_be_undone_are_refused(cmd: str, text: str) -> None:
    with pytest.raises(CniError) as err:
        ethtool.render((cmd,), "dev0", None)
    assert err.value.code == 7 and text in err.value.msg


def test_ntuple_is_switched_on_only_for_a_flow_rule() -> None:
    argvs = ethtool.render(("-N -device- flow-type udp4 action 2",), "dev0", None)
    assert argvs[0] == ["--features", "dev0", "ntuple", "on"]
    assert ethtool.render(("-X -device- equal 2",), "dev0", None) == [["-X", "dev0", "equal", "2"]]


# The handler on real links

pytestmark = pytest.mark.anyio
privileged = pytest.mark.privileged


@privileged
async def test_del_restores_exactly_what_ethtool_cmds_changed(setup: Setup) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chet")
    assert "tx-checksumming: on" in features(dev) and channels(dev)["rx"] == "4"
    before = ethtool.parse_features(features(dev))
    conf = setup.netconf(dev, ethtoolCmds=["-K -device- tx off", "-L -device- rx 2 tx 2"])
    code, out = await setup.call("ADD", conf, netns=f"/run/netns/{ns}")
    assert code == 0, out
    assert "tx-checksumming: off" in features(dev, ns)
    code, out = await setup.call("DEL", conf, netns=f"/run/netns/{ns}")
    assert (code, out) == (0, None)
    assert in_host(dev) and ethtool.parse_features(features(dev)) == before
    assert channels(dev)["rx"] == "4" and channels(dev)["tx"] == "4"
    assert setup.side.came_home_calls == [(dev, False)]


@privileged
async def test_add_failing_half_way_rolls_back_its_ethtool_changes(setup: Setup) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chrb")
    before = ethtool.parse_features(features(dev))
    # veth has no RSS indirection table: -X fails after -K changed the features.
    conf = setup.netconf(dev, ethtoolCmds=["-K -device- tx off", "-X -device- equal 2"])
    code, out = await setup.call("ADD", conf, netns=f"/run/netns/{ns}")
    assert code == 1 and out["code"] == 5 and "ethtool -X" in out["msg"], out
    assert "everything was undone" in out["details"]
    assert in_host(dev) and not in_pod(ns, dev)
    assert ethtool.parse_features(features(dev)) == before
    assert setup.leases() == set() and setup.handler.store.all() == []


@privileged
async def test_a_failing_rollback_step_is_logged_and_the_others_still_run(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chrf")
    before = ethtool.parse_features(features(dev))
    setup.ipam.set("fail-DEL")
    conf = setup.netconf(dev, ethtoolCmds=["-K -device- tx off", "-X -device- equal 2"])
    with caplog.at_level(logging.ERROR):
        code, out = await setup.call("ADD", conf, netns=f"/run/netns/{ns}")
    refused = "[11] IPAM fakeipam: fake IPAM refuses DEL"
    assert (code, out) == (1, {
        "cniVersion": "1.0.0", "code": 5, "msg": f"ethtool -X {dev} equal 2 failed",
        "details": "Cannot get RX ring count: Operation not supported; "
                   f"undoing it failed too (a DEL retries): {refused}",
    })  # fmt: skip
    assert any("rollback step failed" in r.message and "fake IPAM refuses DEL" in r.message
               for r in caplog.records)  # fmt: skip
    # The other steps ran all the same.
    assert in_host(dev) and ethtool.parse_features(features(dev)) == before
    assert len(setup.leases()) == 1
    # What failed stays recorded: the runtime's DEL finishes it.
    setup.ipam.set("fail-DEL", False)
    code, out = await setup.call("DEL", conf, netns=f"/run/netns/{ns}")
    assert (code, out) == (0, None)
    assert setup.leases() == set() and setup.handler.store.all() == []


@privileged
async def test_del_runs_every_step_and_its_error_lists_each_failure(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chde")
    conf = setup.netconf(dev, ethtoolCmds=["-K -device- tx off"])
    code, out = await setup.call("ADD", conf, netns=f"/run/netns/{ns}")
    assert code == 0, out
    # FAKE ethtool: the real one, except that it refuses to set features.
    fake_bin = setup.tmp / "fake-ethtool-bin"
    fake_bin.mkdir()
    (fake_bin / "ethtool").write_text('#!/bin/sh\n[ "$1" = -K ] && { echo "fake: no" >&2; '
                                      'exit 1; }\nexec /usr/sbin/ethtool "$@"\n')  # fmt: skip
    (fake_bin / "ethtool").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    setup.ipam.set("fail-DEL")
    code, out = await setup.call("DEL", conf, netns=f"/run/netns/{ns}")
    restore = out["msg"]  # which features "tx off" turned off is the kernel's business
    assert restore.startswith(f"ethtool -K {dev} ") and restore.endswith(" on failed"), out
    assert (code, out) == (1, {
        "cniVersion": "1.0.0", "code": 5, "msg": restore,  # the first failure's code and msg
        "details": f"[5] {restore}: fake: no; [11] IPAM fakeipam: fake IPAM refuses DEL",
    })  # fmt: skip
    assert in_host(dev) and setup.side.came_home_calls == [(dev, False)]  # the move still ran
    assert "tx-checksumming: off" in features(dev) and len(setup.leases()) == 1
    # The runtime retries the DEL: only what failed runs again.
    monkeypatch.undo()
    setup.ipam.set("fail-DEL", False)
    code, out = await setup.call("DEL", conf, netns=f"/run/netns/{ns}")
    assert (code, out) == (0, None)
    assert "tx-checksumming: on" in features(dev) and setup.leases() == set()
    assert setup.side.came_home_calls == [(dev, False)]


@privileged
async def test_a_del_that_cannot_bring_the_device_home_keeps_that_step_and_its_ethtool_restore(
    setup: Setup,
) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chmh")
    netns = f"/run/netns/{ns}"
    conf = setup.netconf(dev, ethtoolCmds=["-K -device- tx off"])
    code, out = await setup.call("ADD", conf, netns=netns)
    assert code == 0, out
    # While the device is in the pod, the host gets a link of the same name:
    # the move home is refused (EEXIST), for real.
    ip("link", "add", dev, "type", "veth", "peer", "name", f"{dev}x")
    try:
        code, out = await setup.call("DEL", conf, netns=netns)
        assert code == 1 and out["msg"] == f"moving {dev} out of {netns} failed", out
        assert out["code"] == 5 and "File exists" in out["details"], out
        # The lease went back all the same; the move and the ethtool restore wait.
        assert setup.leases() == set() and in_pod(ns, dev)
        (record,) = setup.handler.store.all()
        assert (record.moved, record.ipam, record.home, record.complete) == (True, False, False,
                                                                             False)  # fmt: skip
        assert [c["kind"] for c in record.ethtool] == ["features"]
        assert setup.side.came_home_calls == []  # it did not come home
    finally:
        ip("link", "del", dev)
    code, out = await setup.call("DEL", conf, netns=netns)  # the runtime's retry
    assert (code, out) == (0, None)
    assert in_host(dev) and "tx-checksumming: on" in features(dev)
    assert setup.handler.store.all() == [] and setup.side.came_home_calls == [(dev, False)]
    assert setup.ipam.calls() == ["ADD ctr1", "DEL ctr1"]  # the retry released nothing twice


@privileged
async def test_a_del_whose_ipam_plugin_is_gone_since_add_logs_the_leak_and_undoes_the_rest(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chgo")
    netns = f"/run/netns/{ns}"
    before = ethtool.parse_features(features(dev))
    plugin = setup.ipam.bin / "vanishing"  # the real host-local, under a name of its own
    shutil.copy(f"{HOST_LOCAL_DIR}/host-local", plugin)
    conf = setup.netconf(dev, ethtoolCmds=["-K -device- tx off"])
    conf["ipam"]["type"] = "vanishing"
    code, out = await setup.call("ADD", conf, netns=netns)
    assert code == 0, out
    (address,) = (i["address"] for i in out["ips"])
    plugin.unlink()  # uninstalled while the pod ran
    with caplog.at_level(logging.ERROR):
        for _ in range(2):  # and the runtime's DEL is not told to retry for ever
            code, out = await setup.call("DEL", conf, netns=netns)
            assert (code, out) == (0, None)
    # Everything else is undone.
    assert in_host(dev) and ethtool.parse_features(features(dev)) == before
    assert setup.side.came_home_calls == [(dev, False)]
    assert setup.handler.store.all() == []
    # The lease is left where only the plugin could free it, and the log names it, once.
    assert setup.leases() == {address.split("/")[0]}
    (leak,) = [r.getMessage() for r in caplog.records if "LEAKED" in r.getMessage()]
    assert f"ctr1/net1 (network afxdp-net, device {dev}, addresses {address})" in leak
    assert "no IPAM plugin 'vanishing' on CNI_PATH" in leak


@privileged
async def test_an_ipam_plugin_missing_or_not_startable_at_add_is_no_step_for_del_to_undo(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chnx")
    netns = f"/run/netns/{ns}"
    missing = setup.netconf(dev)
    missing["ipam"]["type"] = "nosuch"
    with caplog.at_level(logging.ERROR):
        code, out = await setup.call("ADD", missing, netns=netns)
    assert code == 1 and out["msg"] == "ipam.type: no IPAM plugin 'nosuch' on CNI_PATH", out
    # Refused before any step: the device never left, nothing to undo, no leak.
    assert setup.side.came_home_calls == [] and setup.handler.store.all() == []
    assert not [r for r in caplog.records if "LEAKED" in r.getMessage()]
    # A plugin that is there but cannot be started allocated nothing either.
    (setup.ipam.bin / "noexec").write_text("#!/bin/sh\nexit 0\n")  # no x bit: exec fails
    conf = setup.netconf(dev)
    conf["ipam"]["type"] = "noexec"
    code, out = await setup.call("ADD", conf, netns=netns)
    assert code == 1 and out["code"] == 5 and out["msg"] == "IPAM noexec VERSION could not run"
    assert "everything was undone" in out["details"], out
    assert setup.handler.store.all() == [] and in_host(dev)
    for stdin in (missing, conf):  # the runtime's DELs need neither plugin
        code, out = await setup.call("DEL", stdin, netns=netns)
        assert (code, out) == (0, None)


@privileged
async def test_skip_unload_bpf_reaches_the_device_side_when_the_device_comes_home(
    setup: Setup,
) -> None:
    dev = setup.devices[0]
    netns = f"/run/netns/{setup.lab.netns('chsk')}"
    conf = setup.netconf(dev, skipUnloadBpf=True)
    assert (await setup.call("ADD", conf, netns=netns))[0] == 0
    assert await setup.call("DEL", conf, netns=netns) == (0, None)
    assert setup.side.came_home_calls == [(dev, True)]


@privileged
async def test_del_for_a_container_holding_no_attachment_of_the_device_touches_nothing(
    setup: Setup,
) -> None:
    d0, d1, _ = setup.devices
    ns = setup.lab.netns("chfd")
    netns = f"/run/netns/{ns}"
    conf = setup.netconf(d0, ethtoolCmds=["-K -device- tx off"])
    code, out = await setup.call("ADD", conf, netns=netns, container="holder")
    assert code == 0, out
    leases = setup.leases()
    for container, ifname, dev in (("other", "net1", d0), ("holder", "net2", d0),
                                   ("holder", "net1", d1)):  # fmt: skip
        code, out = await setup.call("DEL", setup.netconf(dev), netns=netns, container=container,
                                     ifname=ifname)  # fmt: skip
        assert (code, out) == (0, None)
    assert in_pod(ns, d0) and setup.leases() == leases  # no IPAM DEL, no move
    assert "tx-checksumming: off" in features(d0, ns)  # no ethtool restore
    assert setup.side.came_home_calls == []
    assert len(setup.handler.store.all()) == 1


@privileged
async def test_runtime_retry_add_fails_del_add_succeeds(setup: Setup) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chrt")
    netns = f"/run/netns/{ns}"
    setup.ipam.set("fail-ADD")
    code, out = await setup.call("ADD", setup.netconf(dev), netns=netns)
    assert code == 1 and out["code"] == 11, out
    code, out = await setup.call("DEL", setup.netconf(dev), netns=netns)
    assert (code, out) == (0, None)
    setup.ipam.set("fail-ADD", False)
    code, out = await setup.call("ADD", setup.netconf(dev), netns=netns)
    assert code == 0, out
    assert in_pod(ns, dev) and len(setup.leases()) == 1


@privileged
async def test_an_add_tells_the_device_side_its_pods_name_once_done_and_only_then(
    setup: Setup,
) -> None:
    dev = setup.devices[0]
    netns = f"/run/netns/{setup.lab.netns('chpn')}"
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=pod-a"
    setup.ipam.set("fail-ADD")
    code, out = await setup.call("ADD", setup.netconf(dev), netns=netns, args=args)
    assert code == 1, out
    assert setup.side.attached == []  # a failed ADD put the device in no pod
    setup.ipam.set("fail-ADD", False)
    code, out = await setup.call("ADD", setup.netconf(dev), netns=netns, args=args)
    assert code == 0, out
    assert setup.side.attached == [(dev, "pod-a")]
    code, out = await setup.call("ADD", setup.netconf(dev), netns=netns, args=args)  # repeated
    assert code == 0 and setup.side.attached == [(dev, "pod-a")] * 2
    other = setup.devices[1]  # a runtime that names no pod (a bare CNI call) tells nothing
    code, out = await setup.call("ADD", setup.netconf(other), netns=netns, container="ctr2",
                                 args="IgnoreUnknown=1")  # fmt: skip
    assert code == 0 and setup.side.attached == [(dev, "pod-a")] * 2


@privileged
async def test_repeated_add_returns_the_earlier_answer_without_a_second_lease(
    setup: Setup,
) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chra")
    code, first = await setup.call("ADD", setup.netconf(dev), netns=f"/run/netns/{ns}")
    assert code == 0, first
    code, again = await setup.call("ADD", setup.netconf(dev), netns=f"/run/netns/{ns}")
    assert (code, again) == (0, first)
    assert len(setup.leases()) == 1
    # What a DEL, a GC or a restarted afxdpd needs of it, recorded.
    (record,) = setup.handler.store.all()
    assert (record.container_id, record.ifname, record.device, record.netns, record.network) == (
        "ctr1",
        "net1",
        dev,
        f"/run/netns/{ns}",
        "afxdp-net",
    )
    assert (record.complete, record.ipam, record.moved, record.home) == (True, True, True, False)
    assert record.result == first and record.host_up is True
    assert record.netdev == setup.side.describe(dev)  # the device side's description
    assert record.netconf == setup.netconf(dev) and record.env["CNI_CONTAINERID"] == "ctr1"


@privileged
async def test_after_a_crash_mid_add_the_record_is_undone_not_answered(setup: Setup) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chcr")
    netns = f"/run/netns/{ns}"
    before = ethtool.parse_features(features(dev))
    conf = setup.netconf(dev, ethtoolCmds=["-K -device- tx off"])
    code, out = await setup.call("ADD", conf, netns=netns)
    assert code == 0, out
    # What a crash just before the ADD's last step leaves: every step taken, the
    # record not complete. A restarted afxdpd reads it back.
    await _left_incomplete(setup.store_path)
    setup.handler = CniHandler(setup.side, AttachmentStore(setup.store_path))
    code, _ = await setup.call("ADD", conf, netns=netns)  # not the earlier answer: redone
    assert code == 0 and len(setup.leases()) == 1 and in_pod(ns, dev)
    assert setup.side.came_home_calls == [(dev, False)]  # the unfinished one was undone first
    await _left_incomplete(setup.store_path)
    setup.handler = CniHandler(setup.side, AttachmentStore(setup.store_path))
    for _ in range(2):  # and a DEL (repeated) undoes it all, idempotently
        code, out = await setup.call("DEL", conf, netns=netns)
        assert (code, out) == (0, None)
    assert in_host(dev) and setup.leases() == set()
    assert ethtool.parse_features(features(dev)) == before


@privileged
async def test_each_add_refusal_says_why_with_its_code_and_leaves_nothing(setup: Setup) -> None:
    d0, d1, d2 = setup.devices
    pod = setup.lab.netns("chrf")
    netns = f"/run/netns/{pod}"
    elsewhere = setup.lab.netns("chre")
    ip("link", "set", d1, "netns", elsewhere)  # in another pod already
    setup.side.allocated[d2] = False  # kubelet never called Allocate for it

    async def refusal(dev: str, netns: str = netns, **env: str) -> dict[str, Any]:
        code, out = await setup.call("ADD", setup.netconf(dev), netns=netns, **env)
        assert code == 1, out
        return dict(out)

    def doc(code: int, msg: str, details: str = "") -> dict[str, Any]:
        want: dict[str, Any] = {"cniVersion": "1.0.0", "code": code, "msg": msg}
        return {**want, "details": details} if details else want

    assert await refusal("nodev") == doc(
        7, "deviceID: nodev is not a device of any afxdp pool here"
    )
    assert await refusal(d2) == doc(
        7, f"deviceID: {d2} is not allocated to a pod (kubelet has not called Allocate for it)"
    )
    setup.side.unknown.add(d2)  # the state record was unreadable: kubelet is asked first
    assert await refusal(d2) == doc(11, f"deviceID: {d2}: who holds it is not known yet (fake)")
    setup.side.unknown.clear()
    assert await refusal(d0, netns="/run/netns/afxdp-none") == doc(
        3, "network namespace /run/netns/afxdp-none does not exist"
    )
    assert await refusal(d1) == doc(
        7, f"deviceID: {d1} is not in the host network namespace",
        "it may still be in another pod's namespace",
    )  # fmt: skip
    assert setup.leases() == set() and setup.handler.store.all() == []
    code, out = await setup.call("ADD", setup.netconf(d0), netns=netns)
    assert code == 0, out
    ip("link", "set", d1, "netns", str(os.getpid()), netns=elsewhere)
    setup.side.allocated[d2] = True
    assert await refusal(d2) == doc(
        7, f"deviceID: net1 of container ctr1 is {d0} already; DEL it first"
    )
    assert [a.device for a in setup.handler.store.all()] == [d0]  # the first ADD stands
    assert len(setup.leases()) == 1


@privileged
async def test_add_into_afxdpds_own_netns_is_refused(setup: Setup) -> None:
    dev = setup.devices[0]
    own = f"/proc/{os.getpid()}/ns/net"
    code, out = await setup.call("ADD", setup.netconf(dev), netns=own)
    assert code == 1 and out["code"] == 4 and "afxdpd's own network namespace" in out["msg"]
    assert setup.leases() == set() and setup.handler.store.all() == []


@privileged
async def test_an_add_whose_device_cannot_get_its_pods_program_back_is_code_11_and_does_nothing(
    setup: Setup,
) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chnp")
    setup.side.programless.add(dev)  # its link re-created, another program on it
    code, out = await setup.call("ADD", setup.netconf(dev), netns=f"/run/netns/{ns}")
    assert code == 1 and out["code"] == 11, out
    assert out["msg"] == f"deviceID: {dev} lacks its pod's XDP program"
    assert "another XDP program (id 7) is attached" in out["details"]
    assert in_host(dev) and not in_pod(ns, dev)
    assert setup.ipam.calls() == [] and setup.handler.store.all() == []
    setup.side.programless.clear()
    code, out = await setup.call("ADD", setup.netconf(dev), netns=f"/run/netns/{ns}")
    assert code == 0 and in_pod(ns, dev), out
    assert setup.side.ensured == [dev, dev]  # asked before each move


@privileged
async def test_other_containers_and_devices_do_not_wait_for_a_blocked_add(setup: Setup) -> None:
    d0, d1, _ = setup.devices
    ns_a, ns_b = setup.lab.netns("chla"), setup.lab.netns("chlb")
    done: list[str] = []

    async def call(tag: str, command: str, dev: str, ns: str, container: str) -> None:
        code, out = await setup.call(command, setup.netconf(dev), netns=f"/run/netns/{ns}",
                                     container=container)  # fmt: skip
        # c's ADD runs after a's: d0 is then a's (7) or, after a's DEL, c's (0).
        assert code == 0 or (tag == "add c on d0" and out["code"] == 7), (tag, out)
        done.append(tag)

    setup.ipam.set("hold-a")
    async with anyio.create_task_group() as tg:
        try:
            tg.start_soon(call, "add a", "ADD", d0, ns_a, "a")
            await setup.ipam.wait_entered("a")  # a's ADD holds its container's and d0's locks
            tg.start_soon(call, "del a", "DEL", d0, ns_a, "a")
            tg.start_soon(call, "add c on d0", "ADD", d0, ns_b, "c")
            with anyio.fail_after(10):
                await call("add b", "ADD", d1, ns_b, "b")  # another container, another device
            assert done == ["add b"]  # the same container's DEL, the same device's ADD wait
        finally:
            setup.ipam.release_all()  # a failure must not leave a's plugin waiting
    assert done[:2] == ["add b", "add a"] and set(done[2:]) == {"del a", "add c on d0"}


@privileged
async def test_check_reports_each_difference_with_its_code(setup: Setup) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chck")
    netns = f"/run/netns/{ns}"
    code, result = await setup.call("ADD", setup.netconf(dev), netns=netns)
    assert code == 0, result
    check = setup.netconf(dev, prevResult=result)
    assert await setup.call("CHECK", check, netns=netns) == (0, None)

    async def fails(want_code: int, msg: str, conf: dict[str, Any] = check,
                    where: str = netns) -> dict[str, Any]:  # fmt: skip
        code, out = await setup.call("CHECK", conf, netns=where)
        assert code == 1 and (out["code"], out["msg"]) == (want_code, msg), out
        return dict(out)

    # 0.4.0 is the first version with CHECK (its prevResult in the 0.4.0 shape).
    old = {**result, "cniVersion": "0.4.0"}
    old["ips"] = [{**a, "version": "4"} for a in result["ips"]]
    assert await setup.call("CHECK", setup.netconf(dev, "0.4.0", prevResult=old),
                            netns=netns) == (0, None)  # fmt: skip
    # What the result does not name is not checked.
    assert await setup.call("CHECK", setup.netconf(dev, prevResult={"cniVersion": "1.0.0"}),
                            netns=netns) == (0, None)  # fmt: skip
    await fails(1, "CHECK needs cniVersion 0.4.0 or later",
                setup.netconf(dev, "0.3.1", prevResult=result))  # fmt: skip
    await fails(7, "prevResult: is required for CHECK", setup.netconf(dev))
    await fails(3, "network namespace /run/netns/none-such-chck does not exist",
                where="/run/netns/none-such-chck")  # fmt: skip
    ip("route", "del", "default", netns=ns)
    await fails(100, f"route to 0.0.0.0/0 is missing in {netns}")
    ip("addr", "flush", "dev", dev, netns=ns)
    lacks = await fails(100, f"{dev} lacks address {result['ips'][0]['address']}")
    assert lacks["details"] == "has []"
    ip("link", "set", dev, "down", netns=ns)
    await fails(100, f"{dev} is down in {netns}")
    ip("link", "set", dev, "netns", str(os.getpid()), netns=ns)
    await fails(100, f"{dev} is not in {netns}")


async def test_status_answers_50_until_the_device_side_is_ready_and_version_lists_ours(
    tmp_path: Path,
) -> None:
    side = FakeDeviceSide([])
    handler = CniHandler(side, AttachmentStore(tmp_path / "a.json"))
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": HOST_LOCAL_DIR}
    stdin = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "afxdp"}).encode()
    side.ready = False
    assert await handler.handle(Request(env, stdin)) == (
        1,
        b'{"cniVersion": "1.1.0", "code": 50, "msg": "afxdpd is not ready"}\n',
        b"afxdp: [50] afxdpd is not ready\n",
    )
    side.ready = True
    assert await handler.handle(Request(env, stdin)) == (0, b"", b"")
    version = {"CNI_COMMAND": "VERSION", "CNI_PATH": HOST_LOCAL_DIR}
    code, out, err = await handler.handle(Request(version, b'{"cniVersion": "0.4.0"}'))
    assert (code, json.loads(out), err) == (
        0, {"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0",
                                                        "1.1.0"]}, b"")  # fmt: skip


async def test_an_unexpected_exception_is_internal_error_5_and_the_handler_keeps_serving(
    tmp_path: Path,
) -> None:
    side = FakeDeviceSide(["dev0"])
    handler = CniHandler(side, AttachmentStore(tmp_path / "a.json"))
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/run/netns/x",
           "CNI_IFNAME": "net1", "CNI_PATH": HOST_LOCAL_DIR}  # fmt: skip
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "afxdp",
                        "deviceID": "dev0"}).encode()  # fmt: skip
    side.broken = True
    code, out, err = await handler.handle(Request(env, stdin))
    doc = json.loads(out)
    assert code == 1 and doc["code"] == 5 and doc["msg"] == "internal error in afxdpd"
    assert doc["cniVersion"] == "1.0.0"  # the request's version, as every error
    assert "device side bug" in doc["details"] and b"internal error" in err
    side.broken = False
    status = {"CNI_COMMAND": "STATUS", "CNI_PATH": HOST_LOCAL_DIR}
    assert await handler.handle(Request(status, stdin)) == (0, b"", b"")  # still serving


def _host_flags(dev: str) -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show", dev], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    flags: list[str] = json.loads(out)[0]["flags"]
    return flags


@privileged
async def test_a_del_brings_the_device_home_up_or_down_as_it_was_before_the_add(
    setup: Setup,
) -> None:
    up, down = setup.devices[0], setup.devices[1]
    ip("link", "set", down, "down")
    ns = setup.lab.netns("chud")
    netns = f"/run/netns/{ns}"
    for dev in (up, down):
        code, out = await setup.call("ADD", setup.netconf(dev), netns=netns, ifname=dev)
        assert code == 0, out
    for dev in (up, down):
        code, out = await setup.call("DEL", setup.netconf(dev), netns=netns, ifname=dev)
        assert (code, out) == (0, None)
    assert "UP" in _host_flags(up)
    assert "UP" not in _host_flags(down)


@privileged
async def test_a_del_cut_short_after_the_move_home_leaves_the_retry_to_set_the_link_up(
    setup: Setup,
) -> None:
    dev = setup.devices[0]
    ns = setup.lab.netns("chcu")
    netns = f"/run/netns/{ns}"
    code, out = await setup.call("ADD", setup.netconf(dev), netns=netns)
    assert code == 0, out
    # What a crash between the move home and the link-up leaves: the device is
    # home and down, and its record still says it is in the pod.
    ip("link", "set", dev, "netns", str(os.getpid()), netns=ns)
    ip("link", "set", dev, "down")
    code, out = await setup.call("DEL", setup.netconf(dev), netns=netns)
    assert (code, out) == (0, None)
    assert "UP" in _host_flags(dev)  # as it was before the ADD
    assert setup.leases() == set()


async def _left_incomplete(path: Path) -> None:
    """The record on disk as a crash just before ADD's last step leaves it."""
    store = AttachmentStore(path)
    (record,) = store.all()
    await store.put(replace(record, complete=False))


async def _told_after_a_crash(
    tmp_path: Path, side: FakeDeviceSide, *records: Attachment
) -> AttachmentStore:
    """A handler made (with a task group for after-reply work) over ``records``,
    as afxdpd makes it at start; the store once that work is done."""
    path = tmp_path / "a.json"
    written = AttachmentStore(path)
    for record in records:
        await written.put(record)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            handler = CniHandler(side, AttachmentStore(path), after=tg)
    return handler.store


async def test_a_device_a_crash_left_untold_is_told_at_start_with_its_skip_unload_bpf(
    tmp_path: Path,
) -> None:
    side = FakeDeviceSide(["d0", "d1"])
    home = Attachment("c0", "net1", "d0", "/run/netns/gone", "n", home=True, complete=False,
                      netconf={"cniVersion": "1.0.0", "name": "n", "type": "afxdp",
                               "deviceID": "d0", "skipUnloadBpf": True})  # fmt: skip
    in_pod = Attachment("c1", "net1", "d1", "/run/netns/p", "n")  # a complete ADD: untouched
    store = await _told_after_a_crash(tmp_path, side, home, in_pod)
    assert side.came_home_calls == [("d0", True)]
    assert store.all() == [in_pod]


async def test_a_told_device_keeps_its_record_while_steps_remain_and_a_failed_telling_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    side = FakeDeviceSide(["d0"])
    side.broken = True
    left = Attachment("c0", "net1", "d0", "/run/netns/gone", "n", home=True, complete=False,
                      ipam=True, netconf={"garbage": True})  # fmt: skip
    with caplog.at_level(logging.WARNING):
        store = await _told_after_a_crash(tmp_path, side, left)
    assert side.came_home_calls == [("d0", False)]  # unreadable netconf: the default
    assert store.all() == [replace(left, home=False)]  # the IPAM release is still owed
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("d0: the recorded netconf is unreadable: ") for m in messages)
    assert "d0: telling the device side it came home failed" in messages


@privileged
async def test_gc_undoes_only_its_own_networks_attachments_the_runtime_no_longer_lists(
    setup: Setup,
) -> None:
    d0, d1, d2 = setup.devices
    pods = {d: setup.lab.netns(f"chg{i}") for i, d in enumerate(setup.devices)}
    for dev, ctr, net in ((d0, "keep", "afxdp-net"), (d1, "stale", "afxdp-net"),
                          (d2, "theirs", "other-net")):  # fmt: skip
        code, out = await setup.call("ADD", setup.netconf(dev, name=net),
                                     netns=f"/run/netns/{pods[dev]}", container=ctr)  # fmt: skip
        assert code == 0, out
    gc = setup.netconf("", "1.1.0")
    del gc["deviceID"]
    gc["cni.dev/valid-attachments"] = [{"containerID": "keep", "ifname": "net1"}]
    assert await setup.call("GC", gc) == (0, None)
    assert in_pod(pods[d0], d0) and in_host(d1) and in_pod(pods[d2], d2)
    assert sorted(a.container_id for a in setup.handler.store.all()) == ["keep", "theirs"]
    assert setup.side.came_home_calls == [(d1, False)]
    assert setup.ipam.calls()[-1] == "DEL stale"
