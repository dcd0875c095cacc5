"""Delegating addresses to the IPAM plugin named by ``ipam.type``.

The plugin is found on CNI_PATH and run as a runtime would run it. Plugins do
not all speak the request's version (Debian's host-local 1.1.1 stops at 1.0.0),
so the version is negotiated with the plugin's VERSION first and results are
normalised to the 1.0 shape here; ``result.py`` renders the request's version.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import anyio.to_thread

from afxdp.cni.errors import INVALID_CONFIG, IO_FAILURE, CniError
from afxdp.cni.netconf import Env, NetConf, version_tuple

log = logging.getLogger(__name__)

TIMEOUT = 60.0


def find_plugin(name: str, path: tuple[str, ...]) -> Path:
    for d in path:
        candidate = Path(d) / name
        if candidate.is_file():
            return candidate
    raise CniError(INVALID_CONFIG, f"ipam.type: no IPAM plugin {name!r} on CNI_PATH",
                   ":".join(path))  # fmt: skip


async def _run(plugin: Path, command: str, env: Env, stdin: bytes) -> bytes:
    run_env = {k: v for k, v in env.raw.items() if k.startswith("CNI_")}
    run_env["CNI_COMMAND"] = command

    # subprocess in a worker thread rather than the event loop's pipes: a
    # plugin that exits without reading stdin (VERSION) raced uvloop's writer.
    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(plugin)], input=stdin, env=run_env, capture_output=True, timeout=TIMEOUT,
            check=False,
        )  # fmt: skip

    try:
        done = await anyio.to_thread.run_sync(run)
    except subprocess.TimeoutExpired:
        raise CniError(IO_FAILURE, f"IPAM {plugin.name} {command} timed out") from None
    except OSError as exc:
        raise CniError(
            IO_FAILURE, f"IPAM {plugin.name} {command} could not run", str(exc)
        ) from None
    if done.returncode != 0:
        try:
            err = json.loads(done.stdout)
            raise CniError(int(err["code"]), f"IPAM {plugin.name}: {err.get('msg', '')}",
                           str(err.get("details", "")))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            output = (done.stdout + done.stderr).decode(errors="replace")[:500]
            raise CniError(IO_FAILURE, f"IPAM {plugin.name} {command} failed", output) from None
    return bytes(done.stdout)


# A plugin's VERSION answer, per binary (path and mtime): one exec saved per request.
_versions: dict[tuple[str, int], list[str]] = {}


async def _supported(plugin: Path, env: Env, version: str) -> list[str]:
    key = (str(plugin), plugin.stat().st_mtime_ns)
    if key not in _versions:
        out = await _run(plugin, "VERSION", env, json.dumps({"cniVersion": version}).encode())
        _versions[key] = list(json.loads(out).get("supportedVersions", []))
    return _versions[key]


async def _negotiate(plugin: Path, env: Env, conf: NetConf) -> dict[str, Any]:
    """The netconf to hand the plugin, in a version it speaks."""
    raw = dict(conf.raw)
    supported = await _supported(plugin, env, conf.cni_version)
    if conf.cni_version not in supported:
        older = [v for v in supported if version_tuple(v) <= version_tuple(conf.cni_version)]
        if not older:
            raise CniError(INVALID_CONFIG, f"IPAM {plugin.name} speaks no CNI version up to "
                           f"{conf.cni_version}", str(supported))  # fmt: skip
        raw["cniVersion"] = max(older, key=version_tuple)
        if "prevResult" in raw and version_tuple(raw["cniVersion"]) < (1, 0, 0):
            raw.pop("prevResult")
    return raw


def normalise(result: dict[str, Any]) -> dict[str, Any]:
    """An IPAM result of any version in the 1.0 shape: ips without ``version``."""
    ips = [{k: v for k, v in ip.items() if k != "version"} for ip in result.get("ips", [])]
    return {"ips": ips, "routes": result.get("routes", []), "dns": result.get("dns", {})}


async def add(env: Env, conf: NetConf) -> dict[str, Any]:
    assert conf.ipam_type is not None
    plugin = find_plugin(conf.ipam_type, env.path)
    raw = await _negotiate(plugin, env, conf)
    result = normalise(json.loads(await _run(plugin, "ADD", env, json.dumps(raw).encode())))
    if not result["ips"]:
        await delete(env, conf)
        raise CniError(IO_FAILURE, f"IPAM {plugin.name} returned no addresses")
    return result


async def delete(env: Env, conf: NetConf) -> None:
    assert conf.ipam_type is not None
    plugin = find_plugin(conf.ipam_type, env.path)
    raw = await _negotiate(plugin, env, conf)
    await _run(plugin, "DEL", env, json.dumps(raw).encode())


async def check(env: Env, conf: NetConf, prev: dict[str, Any]) -> None:
    assert conf.ipam_type is not None
    plugin = find_plugin(conf.ipam_type, env.path)
    raw = await _negotiate(plugin, env, conf)
    if version_tuple(raw["cniVersion"]) < (0, 4, 0):
        return  # the plugin has no CHECK
    raw["prevResult"] = prev
    await _run(plugin, "CHECK", env, json.dumps(raw).encode())
