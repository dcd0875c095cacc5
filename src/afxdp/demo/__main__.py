"""Entry point of the demo: checks, a work dir, signals, clean-up, the summary."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import anyio

from afxdp.cni import shim
from afxdp.demo.lab import LabError
from afxdp.demo.podman import Podman, PodmanError
from afxdp.demo.story import CNI_PATH, DemoError, Story, cleanup_stack

INTERRUPTED = 130


def problems(podman: bool) -> list[str]:
    """What this machine lacks for the demo (scripts/bootstrap installs all of it)."""
    found = []
    if os.geteuid() != 0:
        found.append("run it as root (it creates network namespaces and loads XDP)")
    try:
        shim.path()
    except FileNotFoundError as exc:
        found.append(str(exc))
    if not (CNI_PATH / "host-local").exists():
        found.append(f"{CNI_PATH}/host-local is missing (apt install containernetworking-plugins)")
    for tool in ("ip", "nsenter", "unshare", "umount", *(["podman"] if podman else [])):
        if shutil.which(tool) is None:
            found.append(f"{tool} is not installed")
    return found


async def _watch_signals(body: anyio.CancelScope, got: list[int]) -> None:
    """The first SIGINT/SIGTERM stops the story; later ones must not cut the clean-up short."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            got.append(signum)
            name = signal.Signals(signum).name
            if len(got) == 1:
                print(f"\n{name}: stopping; cleaning up ...", flush=True)
                body.cancel()
            else:
                print(f"{name}: still cleaning up, please wait", flush=True)


async def _main(story: Story) -> int:
    got: list[int] = []
    summary, failure = "", ""
    async with anyio.create_task_group() as tg:
        body = anyio.CancelScope()
        tg.start_soon(_watch_signals, body, got)
        with body:
            try:
                async with cleanup_stack() as stack:
                    # The work dir goes last, after everything that lives in it.
                    stack.callback(shutil.rmtree, story.work, True)
                    # Where the shim may reach afxdpd is the installer's choice, not the netconf's.
                    shim.install(story.cni_bin, [story.run_dir])
                    summary = await story.run(stack)
            except (DemoError, LabError, PodmanError, OSError, TimeoutError) as exc:
                failure = str(exc)
        with anyio.CancelScope(shield=True):
            left = await story.lab.leftovers()
        tg.cancel_scope.cancel()
    if left:
        print(f"demo: LEFT BEHIND: {', '.join(left)}", flush=True)
    if got:
        print(f"demo: interrupted at step {story.step_no}; cleaned up"
              f"{'' if left else ', nothing left behind'}", flush=True)  # fmt: skip
        return INTERRUPTED
    if failure:
        print(f"demo: FAILED at step {story.step_no}: {failure}", flush=True)
        return 1
    if left:
        return 1
    print(f"\n{summary}; nothing left behind", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m afxdp.demo", description=__doc__)
    ap.add_argument("--frames", type=int, default=50_000, help="frames per pod (%(default)s)")
    ap.add_argument("--tag", default=secrets.token_hex(2),
                    help="suffix of every name this run makes (default: random)")  # fmt: skip
    ap.add_argument(
        "--podman", action="store_true", help="pods as podman containers on an afxdp CNI network"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="   demo: %(message)s")
    missing = problems(args.podman)
    if missing:
        print("demo: cannot run here:\n" + "\n".join(f"  - {p}" for p in missing), file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix=f"afxdp-demo-{args.tag}-"))
    print(f"afxdp demo (run {args.tag}, work dir {work}): a node, a stand-in kubelet, two pods")
    story = Story(args.tag, work, args.frames)
    if args.podman:
        story.podman = Podman(work, story.cni_bin, args.tag)
    return anyio.run(_main, story)


if __name__ == "__main__":
    sys.exit(main())
