"""The soak's short version (tests/soak.py; the nox session ``soak`` runs 1,000).

afxdpd as a process, kubelet's double, the real CNI shim with host-local, real
veths and netns: 40 pod lifecycles, 4 at a time, each NIC reclaimed from the
previous pod at Allocate, while 40 slowloris clients keep taking every slot of
the metrics port. It fails on any failed step, on anything left behind (XDP
program, pin, socket, netns, lease, attachment record, a NIC not home), when
afxdpd does not exit 0 on SIGTERM, when its fds or threads grow, or when one
probe of /healthz or /readyz is not a 200 within 1 s (issue 19).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import soak

pytestmark = [pytest.mark.privileged, pytest.mark.anyio]

# Sampled after 4 and after 40 lifecycles: fds and threads hold the full run's
# bounds. RSS does not settle within 40 lifecycles (the allocator warms up;
# about +2 % seen here), so the short run only catches a gross leak: 15 %
# (~8 MiB) is some 200 KiB per lifecycle. The 5 % bound is the full run's.
SHORT = soak.Bounds(rss_percent=15.0)


async def test_pod_lifecycles_leave_nothing_behind_and_do_not_grow(tmp_path: Path) -> None:
    summary = await soak.soak(lifecycles=40, concurrency=4, work=tmp_path, bounds=SHORT,
                              time_limit=50, slowloris=soak.SLOWLORIS)  # fmt: skip
    assert summary.afxdpd_exit == 0
    assert (summary.leaks, summary.growth) == ([], [])
    assert summary.probes > 0 and (summary.probe_failures, summary.probes_failed) == (0, [])
    assert summary.slowloris_connections > soak.SLOWLORIS  # cut off by afxdpd, and back
    assert [s.after for s in summary.samples] == list(range(4, 41, 4))
    assert summary.watch_updates > 0  # kubelet's ListAndWatch stream was served throughout
