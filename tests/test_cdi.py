"""CDI specs: their shape, kept in step with the pool, written atomically, and
applied for real by podman 4.3 (which reads CDI specs from /var/run/cdi)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from afxdp import cdi
from afxdp.config import Pool
from tests.test_podman_e2e import busybox_image, podman_env

# -- CDI 0.3.0, written down independently of afxdp.cdi ------------------------
# The fields of the first tagged CDI spec; an unknown field fails (a runtime of
# that version would not know it: 'type' on a mount, for one, is 0.4.0).


class _Mount(msgspec.Struct, forbid_unknown_fields=True):
    hostPath: str
    containerPath: str
    options: list[str] = []


class _DeviceNode(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    type: str = ""
    major: int = 0
    minor: int = 0
    fileMode: int = 0
    permissions: str = ""
    uid: int = 0
    gid: int = 0


class _Hook(msgspec.Struct, forbid_unknown_fields=True):
    hookName: str
    path: str
    args: list[str] = []
    env: list[str] = []
    timeout: int | None = None


class _Edits(msgspec.Struct, forbid_unknown_fields=True):
    env: list[str] = []
    deviceNodes: list[_DeviceNode] = []
    hooks: list[_Hook] = []
    mounts: list[_Mount] = []


class _Device(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    containerEdits: _Edits


class _Spec(msgspec.Struct, forbid_unknown_fields=True):
    cdiVersion: str
    kind: str
    devices: list[_Device]
    containerEdits: _Edits | None = None


# Names as podman 4.3's CDI library (0.5.x) parses them.
_VENDOR = r"[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?"
_CLASS = r"[A-Za-z](?:[A-Za-z0-9_-]*[A-Za-z0-9])?"
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


def assert_cdi_030(doc: dict[str, Any]) -> _Spec:
    spec = msgspec.convert(doc, _Spec)
    assert spec.cdiVersion == "0.3.0"
    assert re.fullmatch(f"{_VENDOR}/{_CLASS}", spec.kind), spec.kind
    assert spec.devices, "a CDI spec names at least one device"
    names = [d.name for d in spec.devices]
    assert len(set(names)) == len(names)
    for dev in spec.devices:
        assert _NAME.fullmatch(dev.name), dev.name
        assert all(_ENV.fullmatch(e) for e in dev.containerEdits.env)
        for m in dev.containerEdits.mounts:
            assert m.hostPath.startswith("/") and m.containerPath.startswith("/")
    return spec


def pool(name: str, **kw: Any) -> Pool:
    return Pool(name=name, mode="primary", **kw)


DIRS = {"uds_dir": Path("/run/afxdp/uds"), "pin_dir": Path("/run/afxdp/pin")}


# -- the spec --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "host"),
    [
        ({}, "/run/afxdp/uds/{dev}"),
        ({"bpf_map_pinning_enable": True}, "/run/afxdp/pin/mypool/{dev}"),
        ({"uds_server_disable": True}, None),
    ],
    ids=["uds", "pinned", "bare-netdev"],
)
def test_spec_is_cdi_030_with_a_mount_and_an_env_var_per_device(
    mode: dict[str, bool], host: str | None
) -> None:
    doc = cdi.spec_for(pool("mypool", **mode), ["ens1f1", "ens1f0"], **DIRS)
    assert doc is not None
    spec = assert_cdi_030(json.loads(json.dumps(doc)))  # as a runtime reads it
    assert spec.kind == "afxdp.dev/mypool"
    assert [d.name for d in spec.devices] == ["ens1f0", "ens1f1"]
    for dev in spec.devices:
        assert dev.containerEdits.env == [f"AFXDP_DEVICE_MYPOOL_{dev.name.upper()}={dev.name}"]
        # The pool's list variable is Allocate's: a CDI edit applied after it
        # would overwrite it with one device.
        assert not any(e.startswith("AFXDP_DEVICES_") for e in dev.containerEdits.env)
        if host is None:
            assert dev.containerEdits.mounts == []
        else:  # the directory, so that a re-created socket is seen
            assert dev.containerEdits.mounts == [
                _Mount(host.format(dev=dev.name), f"/tmp/afxdp_dp/{dev.name}", ["rbind", "rw"])
            ]
    assert cdi.device_name("mypool", "ens1f0") == "afxdp.dev/mypool=ens1f0"


def test_names_a_cdi_runtime_rejects_get_no_cdi_device() -> None:
    assert cdi.spec_for(pool("1g"), ["eth0"], **DIRS) is None  # a class starts with a letter
    doc = cdi.spec_for(pool("p"), ["eth0", "veth@0", "eth1-", "_x"], **DIRS)
    assert doc is not None
    assert [d["name"] for d in doc["devices"]] == ["eth0"]
    assert cdi.spec_for(pool("p"), ["veth@0"], **DIRS) is None  # no device: no spec


def test_similar_netdevs_keep_their_own_variables() -> None:
    # '_' for punctuation would merge these, and one device would vanish.
    names = ["eth-1", "eth_1", "eth.1", "ETH1", "eth1"]
    assert len({cdi.env_var("p", n) for n in names}) == len(names)
    assert cdi.env_var("p", "eth0.100") == "AFXDP_DEVICE_P_ETH0_2E100"


@given(
    st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=0x24F), min_size=1, max_size=15),
             min_size=2, max_size=8, unique=True),
)  # fmt: skip
def test_every_netdev_name_gets_a_variable_of_its_own(netdevs: list[str]) -> None:
    variables = [cdi.env_var("pool1", n) for n in netdevs]
    assert len(set(variables)) == len(netdevs)
    assert all(re.fullmatch(r"AFXDP_DEVICE_POOL1_[A-Z0-9_]+", v) for v in variables)


# -- on disk ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_spec_follows_the_pools_devices(tmp_path: Path) -> None:
    cdi_dir = tmp_path / "cdi"
    specs = cdi.CdiSpecs(cdi_dir, **DIRS)
    p = pool("mypool")
    path = cdi_dir / "afxdp.dev-mypool.json"

    def on_disk() -> list[str]:
        return [d.name for d in assert_cdi_030(json.loads(path.read_text())).devices]

    await specs.update(p, ["eth0", "eth1"])
    assert on_disk() == ["eth0", "eth1"]
    assert path.stat().st_mode & 0o777 == 0o644
    assert specs.names("mypool", ["eth1", "eth0"]) == [
        "afxdp.dev/mypool=eth1",
        "afxdp.dev/mypool=eth0",
    ]
    inode = path.stat().st_ino
    await specs.update(p, ["eth1", "eth0"])  # the same devices: the file stays
    assert path.stat().st_ino == inode
    await specs.update(p, ["eth1", "eth2"])
    assert on_disk() == ["eth1", "eth2"]
    assert specs.names("mypool", ["eth0", "eth2"]) == ["afxdp.dev/mypool=eth2"]
    await specs.update(p, [])  # a spec with no device is invalid: none at all
    assert not path.exists()
    assert specs.names("mypool", ["eth1"]) == []
    assert sorted(os.listdir(cdi_dir)) == []  # no temporary file left either


@pytest.mark.anyio
async def test_start_removes_only_our_specs_of_unconfigured_pools(tmp_path: Path) -> None:
    cdi_dir = tmp_path / "cdi"
    cdi_dir.mkdir()
    for name in ("afxdp.dev-old.json", "afxdp.dev-mypool.json", "nvidia.com-gpu.json"):
        (cdi_dir / name).write_text("{}")
    specs = cdi.CdiSpecs(cdi_dir, **DIRS)
    await specs.start([pool("mypool")])
    assert sorted(os.listdir(cdi_dir)) == ["afxdp.dev-mypool.json", "nvidia.com-gpu.json"]
    await specs.start([])  # CDI switched off: none of ours stays
    assert sorted(os.listdir(cdi_dir)) == ["nvidia.com-gpu.json"]


@pytest.mark.anyio
async def test_no_device_is_named_that_no_spec_on_disk_describes(tmp_path: Path) -> None:
    # A runtime refuses a container asking for a CDI device it cannot find, so
    # a spec that cannot be written must not be named in Allocate.
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    specs = cdi.CdiSpecs(not_a_dir, **DIRS)
    await specs.update(pool("mypool"), ["eth0"])
    assert specs.names("mypool", ["eth0"]) == []


def test_a_reader_never_sees_half_a_spec(tmp_path: Path) -> None:
    """Rewrites of a big and a small spec, read all the while from another thread."""
    cdi_dir = tmp_path / "cdi"
    big = cdi.spec_for(pool("mypool"), [f"eth{i}" for i in range(2000)], **DIRS)
    small = cdi.spec_for(pool("mypool"), ["eth0"], **DIRS)
    assert big is not None and small is not None
    path = cdi.spec_path(cdi_dir, "mypool")
    cdi.write_spec(cdi_dir, small)
    done = threading.Event()
    seen: list[int] = []
    bad: list[str] = []

    def read() -> None:
        while not done.is_set():
            text = path.read_text()
            try:
                seen.append(len(json.loads(text)["devices"]))
            except ValueError:
                bad.append(text[-40:])

    reader = threading.Thread(target=read)
    old_umask = os.umask(0o077)  # the mode must not depend on afxdpd's umask
    reader.start()
    try:
        for i in range(150):
            assert cdi.write_spec(cdi_dir, big if i % 2 == 0 else small)
    finally:
        done.set()
        reader.join()
        os.umask(old_umask)
    assert bad == []
    assert set(seen) <= {1, 2000} and len(seen) > 10
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(cdi_dir) == [path.name]


# -- with podman -------------------------------------------------------------------


class Podman:
    """A private podman (tests.test_podman_e2e's recipe) and a spec in /var/run/cdi.

    Podman 4.3 reads CDI specs only from /etc/cdi and /var/run/cdi (it ignores
    containers.conf's cdi_spec_dirs), so the spec goes into the real directory
    under a pool name of its own, and is removed afterwards.
    """

    def __init__(self, tmp: Path) -> None:
        if shutil.which("podman") is None:
            pytest.fail("podman is not installed: scripts/bootstrap installs it")
        self.cmd, self.env = podman_env(tmp)
        self.pool = f"cdit{secrets.token_hex(3)}"
        self.cdi_dir = Path("/var/run/cdi")
        self.image = busybox_image(tmp, self.cmd, self.env)

    def close(self) -> None:
        cdi.remove_spec(self.cdi_dir, self.pool)
        subprocess.run([*self.cmd, "system", "reset", "--force"], env=self.env,
                       capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(self.cmd[2].rsplit("/", 1)[0], ignore_errors=True)

    def argv(self, devices: list[str], script: str) -> list[str]:
        return [*self.cmd, "run", "--rm", "--network", "none",
                *[a for d in devices for a in ("--device", cdi.device_name(self.pool, d))],
                self.image, "sh", "-c", script]  # fmt: skip


@pytest.fixture
def podman(tmp_path: Path) -> Any:
    pm = Podman(tmp_path)
    try:
        yield pm
    finally:
        pm.close()


@pytest.mark.privileged
@pytest.mark.anyio
@pytest.mark.parametrize("pinned", [False, True], ids=["uds", "pinned"])
async def test_podman_container_gets_the_directory_and_the_env(
    tmp_path: Path, podman: Podman, pinned: bool
) -> None:
    dev = f"afx{secrets.token_hex(3)}"
    p = pool(podman.pool, bpf_map_pinning_enable=pinned)
    dirs = {"uds_dir": tmp_path / "uds", "pin_dir": tmp_path / "pin"}
    host = cdi.host_dir(p, dev, **dirs)
    assert host is not None
    host.mkdir(parents=True)
    (host / "afxdp.sock").write_text("")  # what the pod looks for (a file does here)
    spec = cdi.spec_for(p, [dev], **dirs)
    assert spec is not None
    cdi.write_spec(podman.cdi_dir, spec)
    pod_dir = f"/tmp/afxdp_dp/{dev}"
    # A file that appears after the container started must be seen in it: what
    # a restarted afxdpd's new socket needs (a mounted file would pin the old).
    script = (
        f"env; ls {pod_dir}/; echo LISTED; "
        f"while [ ! -e {pod_dir}/late ]; do sleep 0.05; done; echo SEEN"
    )
    out = b""
    with anyio.fail_after(30):
        # stderr goes to pytest's capture, shown when the test fails
        argv = podman.argv([dev], script)
        async with await anyio.open_process(argv, env=podman.env, stderr=None) as proc:
            assert proc.stdout is not None
            async for chunk in proc.stdout:
                out += chunk
                if b"LISTED\n" in out and not (host / "late").exists():
                    (host / "late").write_text("")
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert f"\n{cdi.env_var(podman.pool, dev)}={dev}\n" in f"\n{text}", text
    assert "afxdp.sock\n" in text.split("LISTED")[0], text
    assert "SEEN" in text, text


@pytest.mark.privileged
@pytest.mark.anyio
async def test_podman_container_with_two_devices_learns_both(
    tmp_path: Path, podman: Podman
) -> None:
    devs = [f"afx{secrets.token_hex(3)}", f"afx{secrets.token_hex(3)}"]
    p = pool(podman.pool)
    dirs = {"uds_dir": tmp_path / "uds", "pin_dir": tmp_path / "pin"}
    for dev in devs:
        host = cdi.host_dir(p, dev, **dirs)
        assert host is not None
        host.mkdir(parents=True)
        (host / f"only-{dev}").write_text("")
    spec = cdi.spec_for(p, devs, **dirs)
    assert spec is not None
    cdi.write_spec(podman.cdi_dir, spec)
    script = "env; " + "; ".join(f"ls /tmp/afxdp_dp/{d}/" for d in devs)
    done = await anyio.run_process(podman.argv(devs, script), env=podman.env, check=False)
    text = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    lines = text.splitlines()
    for dev in devs:
        assert f"{cdi.env_var(podman.pool, dev)}={dev}" in lines, text
        assert f"only-{dev}" in lines, text
    # Each device's directory holds its own content, not the other's.
    assert text.count("only-") == 2, text
