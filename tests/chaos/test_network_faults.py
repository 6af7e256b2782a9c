"""Network faults with ``tc netem`` on the loopback of a network namespace (tests.support.netfault): 200 ms of
delay with jitter, 5 % loss and some reordering of packets for 20 s (5 s short) while an ordered producer feeds
kinesalite; afterwards every event is in the stream, in order per key. Skipped, with the reason, where the
machine has no netem (no ``sch_netem`` in the kernel, or no unprivileged namespaces)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.support.chaos import ROOT, Ledger, Outcome, assert_no_loss, check, short_or_full
from tests.support.netfault import Namespace, netem_missing

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NETEM = "delay 200ms 50ms loss 5% reorder 10%"


def test_network_delay_loss_and_reordering(tmp_path: Path, chaos_outcome: Callable[[Outcome], Outcome]) -> None:
    if reason := netem_missing():
        pytest.skip(f"network faults need tc netem in a namespace: {reason}")
    fault_s = short_or_full(5.0, 20.0)
    with Namespace() as ns:
        driver = ns.run(
            [sys.executable, "-m", "tests.support.netem_driver", str(tmp_path), "1000", "1", str(fault_s), "1"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert driver.stdout is not None
        try:
            assert driver.stdout.readline().strip() == "fault"
            ns.netem(NETEM)
            assert driver.stdout.readline().strip() == "clear"
            ns.clear()
            cleared_at = time.monotonic()
            assert driver.stdout.readline().strip() == "done"
            recover_s = time.monotonic() - cleared_at
        finally:
            driver.kill()
            driver.wait()
            driver.stdout.close()
    first, last = map(int, (tmp_path / "accepted").read_text().split())
    ledger = Ledger(tmp_path, "read.out")
    outcome = chaos_outcome(
        check("network: netem on the loopback", range(first, last + 1), ledger, (), ordered=True,
              recover_s=recover_s, notes=f"{NETEM} for {fault_s:.0f} s; read back with the independent reader")
    )  # fmt: skip
    assert_no_loss(outcome, ledger, range(first, last + 1))
