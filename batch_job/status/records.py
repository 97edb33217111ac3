"""Typed marker records and the summary computed from them (no I/O)."""
from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class MarkerRecord:
    input_key: str
    status: str  # "done" or "failed"
    reason: str | None = None
    retryable: bool | None = None
    exit_code: int | None = None
    warnings: int = 0
    audio_seconds: float | None = None
    real_time_factor: float | None = None
    cost_usd: float | None = None
    finished_at: str | None = None

    @classmethod
    def done(cls, input_key: str, body: Mapping[str, Any]) -> MarkerRecord:
        job = body.get("job") or {}
        cost = job.get("cost") or {}
        return cls(input_key, "done", warnings=len(body.get("warnings") or ()),
                   audio_seconds=job.get("audio_seconds") or body.get("duration"),
                   real_time_factor=job.get("real_time_factor"), cost_usd=cost.get("total_usd"),
                   finished_at=job.get("finished_at"))

    @classmethod
    def failed(cls, input_key: str, body: Mapping[str, Any]) -> MarkerRecord:
        return cls(input_key, "failed", reason=body.get("reason") or "unknown", retryable=body.get("retryable"),
                   exit_code=body.get("exit_code"), finished_at=body.get("failed_at") or body.get("finished_at"))


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@dataclass(frozen=True)
class Summary:
    done: int
    failed: int
    warned: int
    pending: int | None
    failures: dict[str, list[str]] = field(default_factory=dict)
    audio_hours: float = 0.0
    rtf_median: float | None = None
    rtf_p95: float | None = None
    cost_usd: float = 0.0
    objects_without_cost: int = 0

    def as_json(self, *, all_failed: bool = False) -> dict[str, Any]:
        return {"done": self.done, "failed": self.failed, "warned": self.warned, "pending": self.pending,
                "failures": {r: {"count": len(k), "examples": k if all_failed else k[:EXAMPLES_PER_REASON]}
                             for r, k in sorted(self.failures.items())},
                "audio_hours": round(self.audio_hours, 4), "real_time_factor_median": self.rtf_median,
                "real_time_factor_p95": self.rtf_p95, "cost_usd": round(self.cost_usd, 6),
                "objects_without_cost": self.objects_without_cost}


def summarize(records: list[MarkerRecord], input_keys: set[str] | None = None) -> Summary:
    """A success marker beats an error marker for the same key (the job deletes the stale one after)."""
    by_key: dict[str, MarkerRecord] = {}
    for r in records:
        if r.status == "done" or r.input_key not in by_key:
            by_key[r.input_key] = r
    done = [r for r in by_key.values() if r.status == "done"]
    failures: dict[str, list[str]] = defaultdict(list)
    for r in by_key.values():
        if r.status == "failed":
            failures[r.reason or "unknown"].append(r.input_key)
    rtfs = [r.real_time_factor for r in done if r.real_time_factor is not None]
    pending = None if input_keys is None else len(input_keys - by_key.keys())
    return Summary(done=len(done), failed=sum(map(len, failures.values())),
                   warned=sum(r.warnings > 0 for r in done), pending=pending,
                   failures={k: sorted(v) for k, v in failures.items()},
                   audio_hours=sum(r.audio_seconds or 0.0 for r in done) / 3600.0,
                   rtf_median=statistics.median(rtfs) if rtfs else None, rtf_p95=_percentile(rtfs, 0.95),
                   cost_usd=sum(r.cost_usd or 0.0 for r in done),
                   objects_without_cost=sum(r.cost_usd is None for r in done))
