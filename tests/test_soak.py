"""The soak's short version (tests/soak.py; the nox session ``soak`` runs 1,000),
and the soak's own judges, each shown a failure it must name.

afxdpd as a process, kubelet's double, the real CNI shim with host-local, real
veths and netns: 40 pod lifecycles, 4 at a time, each NIC reclaimed from the
previous pod at Allocate, while 40 slowloris clients keep taking every slot of
the metrics port and the config is rewritten and afxdpd sent SIGHUP, valid and
invalid configs in turn, several times a second. It fails on any failed step,
on anything left behind (XDP program, pin, socket, netns, lease, attachment
record, a NIC not home), when afxdpd does not exit 0 on SIGTERM, when its fds
or threads grow, when one probe of /healthz or /readyz is not a 200 within 1 s,
when a second Allocate of a device its pod holds is not refused, when afxdpd's
status shows a device with a pod the soak did not hand it to or free while its
pod holds it, or when a reload is not answered, or applied or refused against
what its config deserves (issue 19).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from afxdp.status import AllocationStatus, DeviceStatus, PodRef, PoolStatus, Status
from tests import soak

# Sampled after 4 and after 40 lifecycles: fds and threads hold the full run's
# bounds. RSS does not settle within 40 lifecycles (the allocator warms up;
# about +2 % seen here), so the short run only catches a gross leak: 15 %
# (~8 MiB) is some 200 KiB per lifecycle. The 5 % bound is the full run's.
SHORT = soak.Bounds(rss_percent=15.0)
DEVICES = ["sk0", "sk1", "sk2"]


@pytest.mark.privileged
@pytest.mark.anyio
async def test_pod_lifecycles_leave_nothing_behind_and_do_not_grow(tmp_path: Path) -> None:
    summary = await soak.soak(lifecycles=40, concurrency=4, work=tmp_path, bounds=SHORT,
                              time_limit=50, slowloris=soak.SLOWLORIS,
                              reloads_per_second=soak.RELOADS_PER_SECOND)  # fmt: skip
    assert summary.afxdpd_exit == 0
    assert (summary.leaks, summary.growth) == ([], [])
    assert summary.probes > 0 and (summary.probe_failures, summary.probes_failed) == (0, [])
    assert summary.slowloris_connections > soak.SLOWLORIS  # cut off by afxdpd, and back
    assert [s.after for s in summary.samples] == list(range(4, 41, 4))
    assert summary.watch_updates > 0  # kubelet's ListAndWatch stream was served throughout
    # Who held what: one of each per lifecycle, afxdpd agreeing, the status read throughout.
    assert summary.allocates_ok == summary.adds_ok == summary.second_allocates_refused == 40
    assert summary.allocate_results["ok"] == 40
    assert summary.holder_checks > 0 and summary.holder_problems == []
    # Reloads of every kind ran, each answered as its config deserves.
    assert summary.reload_problems == [] and summary.scrape_failures == []
    assert summary.reloads == sum(summary.reloads_written.values()) > 0
    assert summary.reloads_applied > 0 and summary.reloads_refused > 0
    assert summary.reloads_applied + summary.reloads_refused == (
        summary.reloads + summary.reloads_by_watch
    )


def test_the_reloaders_configs_are_what_it_takes_them_for() -> None:
    """Valid: afxdpd's loader takes it, with the soak's pool and devices as
    they are; invalid: refused (check_config raises SoakError otherwise)."""
    rng = random.Random(19)
    whys = set()
    for _ in range(1000):
        soak.check_config(soak._encode(rng, soak.valid_config(rng, DEVICES)), DEVICES, valid=True)
        why, data = soak.invalid_config(rng, DEVICES)
        soak.check_config(data, DEVICES, valid=False)
        whys.add(why.partition(":")[0])
    assert len(whys) == 11  # every kind of invalid config was made


def test_check_config_names_a_config_that_is_not_what_the_soak_takes_it_for() -> None:
    other_pool = b'{"pools": [{"name": "soak", "mode": "primary", "devices": [{"name": "x"}]}]}'
    with pytest.raises(soak.SoakError, match="changes the pools"):
        soak.check_config(other_pool, DEVICES, valid=True)
    with pytest.raises(soak.SoakError, match="invalid config is valid"):
        soak.check_config(other_pool, DEVICES, valid=False)
    with pytest.raises(soak.SoakError, match="valid config is refused"):
        soak.check_config(b"{", DEVICES, valid=True)


def test_reload_problems_name_a_reload_answered_against_its_config() -> None:
    settled = soak.Reloads(applied=3, refused=2, watched=1, invalid=False)
    applied = soak.Reloads(applied=4, refused=2, watched=1, invalid=False)
    refused = soak.Reloads(applied=3, refused=3, watched=1, invalid=True)
    both = soak.Reloads(applied=4, refused=3, watched=2, invalid=False)
    assert soak.reload_problems("valid, renamed", "", settled, applied) == []
    assert soak.reload_problems("invalid", "x", settled, refused) == []
    assert soak.reload_problems("missing", "", settled, refused) == []
    assert soak.reload_problems("valid, torn", "", settled, refused) == []  # either is right
    assert soak.reload_problems("valid, torn", "", settled, both) == []
    assert soak.reload_problems("valid, in place", "", settled, refused) == [
        "valid, in place: refused (1 of 1 reloads)"
    ]
    assert soak.reload_problems("valid, renamed", "", settled, both) == [
        "valid, renamed: refused (1 of 2 reloads)"
    ]
    assert soak.reload_problems("invalid", "logLevel", settled, applied) == [
        "invalid (logLevel): applied (1 of 1 reloads)"
    ]
    # Applied after all, if the last reload's gauge says so.
    assert soak.reload_problems("missing", "", settled, soak.Reloads(3, 3, 1, False)) == [
        "missing: applied (0 of 1 reloads)"
    ]
    assert soak.reload_problems("invalid", "x", settled, settled) == [
        "invalid (x): the SIGHUP was not answered"
    ]


def _status(
    *devices: DeviceStatus,
    idle: float | None = 30.0,
    registered: bool = True,
    draining: bool = False,
) -> Status:
    pool = PoolStatus(resource="afxdp/soak", mode="primary", registered=registered,
                      devices=list(devices), name=soak.POOL, draining=draining)  # fmt: skip
    handout = AllocationStatus(pool=soak.POOL, device="sk0", uds_idle_timeout=idle)
    return Status(node="n", ready=True, pools=[pool], allocations=[handout])


def test_holder_problems_name_what_the_soaks_record_rules_out() -> None:
    handed = {"sk0": ["p1", "p2", "p3"], "sk1": ["q1"], "sk2": []}
    # Read while sk0 went from p2 to p3 (kubelet listing p2, then p3), sk1 held
    # by q1 throughout, sk2 never handed out.
    before = {"sk0": (2, "p2"), "sk1": (1, "q1"), "sk2": (0, None)}
    after = {"sk0": (3, "p3"), "sk1": (1, "q1"), "sk2": (0, None)}

    def problems(doc: Status) -> list[str]:
        return soak.holder_problems(doc, DEVICES, handed, before, after)

    def dev(name: str, state: str, pod: str | None = None) -> DeviceStatus:
        return DeviceStatus(id=name, state=state, pod=PodRef(pod) if pod else None)

    right = [dev("sk0", "allocated", "p3"), dev("sk1", "allocated", "q1"), dev("sk2", "free")]
    assert problems(_status(*right)) == []
    assert problems(_status(dev("sk0", "free"), *right[1:])) == []  # between p2 and p3
    assert problems(_status(dev("sk0", "allocated", "p2"), *right[1:])) == []
    assert problems(_status(*right, idle=None)) == []  # udsTimeout -1
    assert problems(_status(dev("sk0", "allocated", "p1"), *right[1:])) == [
        "sk0 is shown held by p1; the soak handed it to ['p2', 'p3'] meanwhile"
    ]
    assert problems(_status(right[0], right[1], dev("sk2", "allocated", "q1"))) == [
        "sk2 is shown held by q1; the soak handed it to no pod meanwhile"
    ]
    assert problems(_status(right[0], dev("sk1", "free"), right[2])) == [
        "sk1 is free while kubelet lists pod q1 on it"
    ]
    assert problems(_status(right[0], dev("sk1", "unknown"), right[2])) == [
        "sk1 is unknown while kubelet lists pod q1 on it"
    ]
    assert problems(_status(*right[:2])) == [
        "pool soak has the devices ['sk0', 'sk1'], not ['sk0', 'sk1', 'sk2']"
    ]
    assert problems(_status(*right, idle=5.0)) == [
        "sk0 was handed out with an idle timeout of 5.0 s, which no valid config sets"
    ]
    assert problems(_status(*right, draining=True))[0].startswith("pool soak is not served")
    assert problems(_status(*right, registered=False))[0].startswith("pool soak is not served")


def test_rss_growth_is_a_rise_of_the_last_samples_not_one_spike() -> None:
    """One sample caught between the service's heap trims is no leak; a rise of
    every later sample is (the soak's growth check, on its own)."""

    def run(*rss: int) -> list[soak.Sample]:
        return [soak.Sample(after=100 * (i + 1), fds=50, threads=10, rss_kib=r)
                for i, r in enumerate(rss)]  # fmt: skip

    flat = [60_000, 59_700, 62_200, 61_300, 59_700, 61_800, 61_100, 60_600, 62_800]
    bounds = soak.Bounds()
    assert soak.growth(run(*flat, 102_800), bounds) == []  # one spike at the end
    leak = soak.growth(run(*flat[:6], 66_000, 67_000, 68_000, 69_000), bounds)
    assert len(leak) == 1 and leak[0].startswith("RSS 60000 KiB after 100 -> 68000 KiB after 1000")
