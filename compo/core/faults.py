"""Fault injection for the reliability tests: kill the process or poison a value at a named point.

``COMPO_FAULT="kill:<point>:<n>"`` SIGKILLs the process the n-th time ``point(<point>)`` runs;
``COMPO_FAULT="nan:<point>:<n>"`` makes ``poisoned(<point>)`` true on its n-th call. Several
faults may be given separated by commas. Unset (always, outside tests) every call is a no-op.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def _faults() -> list[tuple[str, str, int]]:
    spec = os.environ.get("COMPO_FAULT", "")
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, rest = item.partition(":")
        name, _, n = rest.rpartition(":")
        out.append((kind, name, int(n)))
    return out


def _hit(kind: str, name: str) -> bool:
    if "COMPO_FAULT" not in os.environ:
        return False
    faults = [f for f in _faults() if f[0] == kind and f[1] == name]
    if not faults:
        return False
    _hits[(kind, name)] = n = _hits.get((kind, name), 0) + 1
    return any(n == f[2] for f in faults)


def point(name: str) -> None:
    """A kill point."""
    if _hit("kill", name):
        os.kill(os.getpid(), signal.SIGKILL)


def poisoned(name: str) -> bool:
    """True where a test asked for a non-finite value at this point."""
    return _hit("nan", name)
