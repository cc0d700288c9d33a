"""The figures the report's parts share: lookups in the results dict, ratios, formatting."""

from __future__ import annotations

from typing import Any


def get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def run_at(section: dict[str, Any] | None, clients: int) -> dict[str, Any] | None:
    for run in (section or {}).get("runs", []):
        if run.get("clients") == clients:
            return dict(run)
    return None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def refused_beyond_essential(results: dict[str, Any], store: str) -> float | None:
    """The relay's CPU per refused post less the essential target's (ms), on one store."""
    ours = get(results, "accept", store, "burst", "refused_cpu_ms_per_post")
    floor = get(results, "accept", f"essential_{store}", "burst", "refused_cpu_ms_per_post")
    if ours is None or floor is None:
        return None
    return round(float(ours) - float(floor), 3)


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}{unit}"
    if isinstance(value, float):
        return f"{value:,.3g}{unit}" if abs(value) < 10 else f"{value:,.0f}{unit}"
    return f"{value}{unit}"
