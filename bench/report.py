"""Summaries of the benchmark CSVs, standard library only (also used by ``scripts/gpu_summary.py``)."""

from __future__ import annotations

import csv
import math
import pathlib
from collections import defaultdict

BASELINES = ("eager_nchw", "eager_channels_last", "compile")


def read_rows(path: str | pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(value: str | None) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def headline(rows: list[dict[str, str]]) -> list[dict[str, object]]:
    """Per (op, model, mode, provider): geomean speedup over each baseline across the model's unique layers, and
    the aggregate % of the measured copy bandwidth (sum of bytes / sum of times over those layers)."""
    groups: dict[tuple[str, str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        if r.get("status") != "ok" or r["provider"] in ("copy", *BASELINES[:2]):
            continue
        for model in r["models"].split(";"):
            groups[(r["op"], model, r["mode"], r["provider"])].append(r)
    out = []
    for (op, model, mode, provider), rs in groups.items():
        entry: dict[str, object] = {"op": op, "model": model, "mode": mode, "provider": provider, "layers": len(rs)}
        for base in BASELINES:
            ups = [v for v in (_float(r[f"speedup_vs_{base}"]) for r in rs) if v is not None]
            entry[f"vs_{base}"] = f"{geomean(ups):.2f}x" if ups else "-"
        total_ms = sum(_float(r["ms"]) or 0.0 for r in rs)
        total_bytes = sum(float(r["bytes"]) for r in rs)
        peak = _float(rs[0]["copy_peak_gbps"])
        entry["pct_copy_bw"] = f"{100 * total_bytes / total_ms / 1e6 / peak:.1f}%" if peak and total_ms else "-"
        out.append(entry)
    return out


def markdown(table: list[dict[str, object]], columns: list[str] | None = None) -> str:
    if not table:
        return "(no rows)\n"
    columns = columns or list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"
