"""Network faults with ``tc netem`` on the loopback of a network namespace of its own, where the machine allows it.

`Namespace()` starts ``unshare -rn`` (a user and a network namespace: no root needed where unprivileged user
namespaces are on) holding a loopback that nothing else shares; `run` starts processes inside it (``nsenter``),
`netem` sets the loopback's delay, jitter, loss, duplication or reordering while they run, `clear` removes it.
Everything a case needs (kinesalite, the producer, a reader) runs inside, since the namespace reaches nothing
outside.

`netem_missing()` says why this machine cannot (no ``unshare``/``tc``/``nsenter``, user namespaces off, or a
kernel without ``sch_netem``), or None.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any

PROBE = "ip link set lo up && tc qdisc add dev lo root netem delay 1ms"


@functools.cache
def netem_missing() -> str | None:
    """Why `tc netem` in a namespace is not available here, or None when it is."""
    for tool in ("unshare", "nsenter", "tc", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", PROBE], capture_output=True, text=True, check=False)
    if probe.returncode == 0:
        return None
    reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit {probe.returncode}"
    if "qdisc kind is unknown" in reason:
        return f"this kernel has no netem qdisc (sch_netem): `tc qdisc add ... netem` says {reason!r}"
    return f"`unshare -rn` + `tc qdisc add dev lo root netem` failed here: {reason}"


class Namespace:
    """A network namespace with its loopback up, held by a sleeping process; see the module doc."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-rn", "sh", "-c", "ip link set lo up && echo up && exec sleep 100000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "up":
            self.close()
            raise RuntimeError("the network namespace did not come up")

    def _enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "-U", "-n", "--preserve-credentials", *argv]

    def run(self, argv: list[str], **popen: Any) -> subprocess.Popen[Any]:
        """Starts `argv` inside the namespace."""
        return subprocess.Popen(self._enter(argv), **popen)

    def netem(self, spec: str) -> None:
        """Sets the loopback's netem qdisc, e.g. ``"delay 100ms 20ms loss 5% reorder 10%"``."""
        subprocess.run(self._enter(["tc", "qdisc", "replace", "dev", "lo", "root", "netem", *spec.split()]), check=True)

    def clear(self) -> None:
        subprocess.run(self._enter(["tc", "qdisc", "del", "dev", "lo", "root"]), check=False, capture_output=True)

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()
        if self.holder.stdout is not None:
            self.holder.stdout.close()

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
