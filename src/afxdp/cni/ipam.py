"""Delegating addresses to the IPAM plugin named by ``ipam.type``.

The plugin is found on CNI_PATH and run as a runtime would run it. Plugins do
not all speak the request's version (Debian's host-local 1.1.1 stops at 1.0.0),
so the version is negotiated with the plugin's VERSION first and results are
normalised to the 1.0 shape here; ``result.py`` renders the request's version.

Each call runs through ``workers.run_program``: its own process group, killed
with its children past TIMEOUT (code 11, try again later). A failing plugin's
CNI error code is passed through; output that is not a usable result is a
code 5 error quoting it.

A plugin that was not started (``NotRun``: not on CNI_PATH, or the exec
failed) changed nothing it keeps, so ADD notes that no IPAM step was taken.
One that is not on CNI_PATH at all is ``Missing``: a DEL cannot release its
lease (handler.py decides what that means).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

from afxdp.cni.errors import INVALID_CONFIG, IO_FAILURE, TRY_AGAIN_LATER, CniError
from afxdp.cni.netconf import Env, NetConf, version_tuple
from afxdp.jsondepth import too_deep
from afxdp.workers import ProgramTimeout, run_program

log = logging.getLogger(__name__)

# Seconds an IPAM plugin gets per call before it is killed with its process
# group (read at each call, so tests can lower it).
TIMEOUT = 60.0
_EXCERPT = 500


class NotRun(CniError):
    """The plugin was not started: nothing it keeps was allocated or released."""


class Missing(NotRun):
    """The plugin is not on CNI_PATH."""


def find_plugin(name: str, path: tuple[str, ...]) -> Path:
    for d in path:
        candidate = Path(d) / name
        if candidate.is_file():
            return candidate
    raise Missing(INVALID_CONFIG, f"ipam.type: no IPAM plugin {name!r} on CNI_PATH",
                  ":".join(path))  # fmt: skip


def _excerpt(*outputs: bytes) -> str:
    return b"".join(outputs).decode(errors="replace").strip()[:_EXCERPT]


def _json(data: bytes) -> Any:
    """``data`` as JSON, or ValueError (bad bytes, bad JSON, absurd nesting alike).

    Nesting is bounded by our own check (``jsondepth``), not by where the
    decoder meets the recursion limit; UTF-8 is decoded here, so the stdlib
    does not guess another encoding from the first bytes.
    """
    if (deep := too_deep(data)) is not None:
        raise ValueError(str(deep))
    return json.loads(data.decode("utf-8"))


def _plugin_error(plugin: Path, command: str, stdout: bytes, stderr: bytes) -> CniError:
    """The error a failed plugin reported, its code passed through when it gave one."""
    try:
        err = _json(stdout)
    except ValueError:
        err = None
    if isinstance(err, dict):
        code, msg = err.get("code"), err.get("msg", "")
        if isinstance(code, int) and not isinstance(code, bool) and code > 0:
            return CniError(code, f"IPAM {plugin.name}: {msg}", str(err.get("details", "")))
    return CniError(IO_FAILURE, f"IPAM {plugin.name} {command} failed", _excerpt(stdout, stderr))


async def _run(plugin: Path, command: str, env: Env, stdin: bytes) -> bytes:
    run_env = {k: v for k, v in env.raw.items() if k.startswith("CNI_")}
    run_env["CNI_COMMAND"] = command
    try:
        done = await run_program([str(plugin)], stdin=stdin, env=run_env, timeout=TIMEOUT)
    except ProgramTimeout:
        # Try again later: the runtime retries, and a hung plugin (a DHCP
        # daemon away, a locked store) may well answer next time.
        raise CniError(TRY_AGAIN_LATER, f"IPAM {plugin.name} {command} did not finish within "
                       f"{TIMEOUT:g} s; it was killed with its children") from None  # fmt: skip
    except OSError as exc:  # not started (run_program's OSError comes from the exec)
        raise NotRun(IO_FAILURE, f"IPAM {plugin.name} {command} could not run", str(exc)) from None
    if done.returncode != 0:
        raise _plugin_error(plugin, command, done.stdout, done.stderr)
    return bytes(done.stdout)


def _result(plugin: Path, command: str, out: bytes) -> dict[str, Any]:
    """A plugin's successful output as a JSON object, or a clean code 5 error."""
    try:
        doc, why = _json(out), ""
    except ValueError as exc:
        doc, why = None, f" ({exc})"
    if not isinstance(doc, dict):
        raise CniError(IO_FAILURE, f"IPAM {plugin.name} {command} printed no JSON object{why}",
                       _excerpt(out))  # fmt: skip
    return doc


# A plugin's VERSION answer, per binary (path and mtime): one exec saved per request.
_versions: dict[tuple[str, int], list[str]] = {}


async def _supported(plugin: Path, env: Env, version: str) -> list[str]:
    try:
        key = (str(plugin), plugin.stat().st_mtime_ns)
    except OSError as exc:  # gone since find_plugin saw it
        raise NotRun(IO_FAILURE, f"IPAM {plugin.name} could not run", str(exc)) from None
    if key not in _versions:
        out = await _run(plugin, "VERSION", env, json.dumps({"cniVersion": version}).encode())
        versions = _result(plugin, "VERSION", out).get("supportedVersions", [])
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            raise CniError(IO_FAILURE, f"IPAM {plugin.name} VERSION: supportedVersions is not "
                           "a list of strings", _excerpt(out))  # fmt: skip
        _versions[key] = versions
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


def _valid_ip(value: Any, network: bool) -> bool:
    try:
        if network:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _check_result(result: dict[str, Any]) -> str | None:
    """What is wrong with an IPAM result's shape (None: nothing); the rest of
    afxdp indexes into it, so a plugin's junk must stop here."""
    ips, routes, dns = result.get("ips", []), result.get("routes", []), result.get("dns", {})
    if not isinstance(ips, list) or not isinstance(routes, list) or not isinstance(dns, dict):
        return "ips and routes must be lists, dns an object"
    for i, ip in enumerate(ips):
        if not isinstance(ip, dict) or not _valid_ip(ip.get("address"), network=True):
            return f"ips[{i}].address is not an address with a prefix"
        if ip.get("gateway") is not None and not _valid_ip(ip["gateway"], network=False):
            return f"ips[{i}].gateway is not an address"
    for i, route in enumerate(routes):
        if not isinstance(route, dict) or not _valid_ip(route.get("dst"), network=True):
            return f"routes[{i}].dst is not a network"
        if route.get("gw") is not None and not _valid_ip(route["gw"], network=False):
            return f"routes[{i}].gw is not an address"
    return None


def normalise(result: dict[str, Any]) -> dict[str, Any]:
    """An IPAM result of any version in the 1.0 shape: ips without ``version``."""
    ips = [{k: v for k, v in ip.items() if k != "version"} for ip in result.get("ips", [])]
    return {"ips": ips, "routes": result.get("routes", []), "dns": result.get("dns", {})}


async def add(env: Env, conf: NetConf) -> dict[str, Any]:
    assert conf.ipam_type is not None
    plugin = find_plugin(conf.ipam_type, env.path)
    raw = await _negotiate(plugin, env, conf)
    out = await _run(plugin, "ADD", env, json.dumps(raw).encode())
    try:
        doc = _result(plugin, "ADD", out)
        problem = _check_result(doc) or (None if doc.get("ips") else "no addresses")
        if problem is not None:
            raise CniError(IO_FAILURE, f"IPAM {plugin.name} returned an unusable result: "
                           f"{problem}", _excerpt(out))  # fmt: skip
    except CniError:
        try:
            await delete(env, conf)  # whatever it did allocate goes back
        except CniError as exc:
            log.warning("IPAM %s DEL after an unusable ADD result failed: %s", plugin.name, exc)
        raise
    return normalise(doc)


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
