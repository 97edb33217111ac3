"""On-demand instance prices and the per-object cost arithmetic (issue #22 item 3).

Prices are us-east-1 Linux on-demand USD per hour, as of ``PRICES_AS_OF``
from ``PRICES_SOURCE``; they drift, so check them and override with
``WHISPER_BATCH_INSTANCE_PRICE_PER_HOUR`` when they do.
cost = wall_seconds / 3600 * price_per_hour / jobs_per_instance.
Unknown instance type and no override: cost is None with a reason, never an error.

NOT CONFIRMED: the figures below were not checked against an AWS pricing page in this
session (no page found in time); ``PRICES_AS_OF`` is the date they were entered, not verified.
"""
from __future__ import annotations

from dataclasses import dataclass

PRICES_AS_OF = "2026-12-06"
PRICES_SOURCE = "aws.amazon.com/ec2/pricing/on-demand (us-east-1, Linux); check before relying on it"


@dataclass(frozen=True)
class InstancePrice:
    instance_type: str
    usd_per_hour: float
    jobs_per_instance: int  # NeuronCores for inf2 (a job is sized to one core); 1 for CPU


PRICE_TABLE: dict[str, InstancePrice] = {p.instance_type: p for p in (
    InstancePrice("inf2.xlarge", 0.7582, 2),
    InstancePrice("inf2.8xlarge", 1.9679, 2),
    InstancePrice("inf2.24xlarge", 6.4906, 12),
    InstancePrice("inf2.48xlarge", 12.9813, 24),
    InstancePrice("c6i.xlarge", 0.17, 1),
    InstancePrice("c6i.2xlarge", 0.34, 1),
    InstancePrice("c7i.xlarge", 0.1785, 1),
    InstancePrice("c7i.2xlarge", 0.357, 1),
    InstancePrice("m6i.xlarge", 0.192, 1),
)}


@dataclass(frozen=True)
class Cost:
    """One object's share of instance time; ``usd`` is None when the price is unknown."""
    usd: float | None
    wall_seconds: float
    usd_per_hour: float | None
    jobs_per_instance: int | None
    instance_type: str
    reason: str = ""


def object_cost(wall_seconds: float, instance_type: str, price_override: float = 0.0,
                jobs_override: int = 0) -> Cost:
    entry = PRICE_TABLE.get(instance_type)
    price = price_override if price_override > 0 else (entry.usd_per_hour if entry else None)
    jobs = jobs_override if jobs_override > 0 else (entry.jobs_per_instance if entry else 1)
    if price is None:
        reason = "unknown instance type" if instance_type else "instance type not known"
        return Cost(None, wall_seconds, None, jobs, instance_type,
                    f"{reason} {instance_type!r}; set WHISPER_BATCH_INSTANCE_PRICE_PER_HOUR")
    usd = round(wall_seconds / 3600.0 * price / jobs, 8)
    return Cost(usd, wall_seconds, price, jobs, instance_type)


IMDS_URL = "http://169.254.169.254"


def instance_type_from_imds(base_url: str = IMDS_URL, timeout: float = 1.0) -> tuple[str, str]:
    """``(instance_type, "")`` from IMDSv2 (token PUT, then GET meta-data/instance-type), or
    ``("", reason)`` when the service is unreachable or refuses: cost is then null with that reason."""
    import urllib.request

    try:
        req = urllib.request.Request(f"{base_url}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            token = r.read().decode()
        req = urllib.request.Request(f"{base_url}/latest/meta-data/instance-type",
                                     headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read().decode().strip(), ""
    except OSError as exc:
        return "", f"instance type from IMDS unavailable ({exc})"


def resolve_instance_type(setting: str, base_url: str = IMDS_URL) -> tuple[str, str]:
    """The setting when given; otherwise IMDSv2's answer (cached for the process)."""
    if setting:
        return setting, ""
    if base_url not in _IMDS_CACHE:
        _IMDS_CACHE[base_url] = instance_type_from_imds(base_url)
    return _IMDS_CACHE[base_url]


_IMDS_CACHE: dict[str, tuple[str, str]] = {}
