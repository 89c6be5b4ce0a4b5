"""The check every library seam's test makes: each internal a seam module lists (its ``*_INTERNALS``)
has the source it had when the seam was written (``FINGERPRINTS``), so an upgrade that changes one
fails loudly and says what to re-check."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
from collections.abc import Callable, Mapping


def source_fingerprint(root: object, dotted: str) -> str:
    """The first 16 hex digits of the SHA-256 of the source of ``root.<dotted>``."""
    target = root
    for part in dotted.split("."):
        target = getattr(target, part)
    return hashlib.sha256(inspect.getsource(target).encode()).hexdigest()[:16]  # type: ignore[arg-type]


def assert_internals_unchanged(
    distribution: str,
    internals: Mapping[str, str],
    fingerprints: Mapping[str, str],
    fingerprint: Callable[[str], str],
    relier: str,
    what: str = "what Jobcast does with it",
) -> None:
    assert set(fingerprints) == set(internals), "fingerprint exactly what the seam's internals list names"
    changed = {name: internals[name] for name in fingerprints if fingerprint(name) != fingerprints[name]}
    assert not changed, (
        f"{distribution} {importlib.metadata.version(distribution)} changed internals that {relier} relies on; "
        f"re-check each against {what}, then record the new fingerprints:\n"
        + "\n".join(f"  {name}: {why} (now {fingerprint(name)})" for name, why in changed.items())
    )
