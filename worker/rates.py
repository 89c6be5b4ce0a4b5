"""What a webhook destination is, and the rates deliveries to one may go out at.

A destination is a URL's ``scheme://host:port``: lower case, the default port written out.
``lua/jobs.lua`` computes the same string (``destination_of``) when it records a delivery; a test
holds the two to the same answers. Rates are ``N/S`` (N deliveries per S seconds, a burst of N),
``JOBCAST_WEBHOOK_RATE`` for every destination and ``JOBCAST_WEBHOOK_RATES`` per destination.

Malformed values raise ``ValueError`` with a message that names the variable; the settings turn
it into their ``ConfigError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DESTINATION_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
#: What a configured destination may look like (it is written into the Lua prelude as a string).
CONFIGURED_RE = re.compile(r"^https?://[a-z0-9.\-]+:[0-9]{1,5}$|^https?://\[[0-9a-f:.]+\]:[0-9]{1,5}$")
RATE_RE = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+(?:\.[0-9]+)?)\s*")
MAX_DESTINATION_LENGTH = 300


def destination_of(url: str) -> str:
    """``scheme://host:port`` of a URL, lower case, the default port made explicit (as in jobs.lua)."""
    match = DESTINATION_RE.match(url)
    if match is None:
        raise ValueError(f"{url[:100]!r} is not an absolute URL")
    scheme = match[1].lower()
    authority = match[2].rpartition("@")[2].lower()
    if not re.search(r":[0-9]+$", authority):
        authority += ":" + ("443" if scheme == "https" else "80")
    return f"{scheme}://{authority}"


@dataclass(frozen=True)
class Rate:
    limit: int
    per_s: float

    @property
    def interval_ms(self) -> float:
        return self.per_s * 1000 / self.limit

    @property
    def tau_ms(self) -> float:
        """The burst tolerance of the GCRA: ``limit`` deliveries may leave at once."""
        return self.interval_ms * (self.limit - 1)

    def __str__(self) -> str:
        return f"{self.limit}/{self.per_s:g}"


def parse_delivery_rate(raw: str, variable: str) -> Rate:
    match = RATE_RE.fullmatch(raw)
    if match is None or int(match[1]) < 1 or float(match[2]) <= 0:
        raise ValueError(
            f"{variable}: {raw!r} is not of the form N/S with N >= 1 and S > 0 "
            "(e.g. '50/1' for 50 deliveries a second to one destination)."
        )
    return Rate(int(match[1]), float(match[2]))


def parse_rates(raw: str) -> dict[str, Rate]:
    """``"https://a.example=10/1, http://b:8080=2/1"`` -> ``{"https://a.example:443": Rate(10, 1), ...}``."""
    rates = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        url, sep, rate = item.rpartition("=")
        try:
            destination = destination_of(url.strip()) if sep else ""
        except ValueError:
            destination = ""
        if not CONFIGURED_RE.match(destination):
            raise ValueError(
                f"JOBCAST_WEBHOOK_RATES: entry {item!r} is not of the form 'scheme://host[:port]=N/S'; "
                "write e.g. JOBCAST_WEBHOOK_RATES='https://hooks.example.com=10/1,http://10.0.0.5:8080=100/1'."
            )
        rates[destination] = parse_delivery_rate(rate, f"JOBCAST_WEBHOOK_RATES ({destination})")
    return rates
