"""PNG plots from the benchmark CSVs of one results directory (matplotlib, Agg).

For each per-op CSV (``dwconv_bn_act.csv``, ``squeeze_excite.csv``) and each mode in it:
``<op>_<mode>_speedup.png`` (per-layer speedup of every provider over eager channels_last; bars) and
``<op>_<mode>_bandwidth.png`` (% of the measured copy bandwidth per layer and provider). For ``models.csv``:
``models_throughput.png`` (images/s per model, task and provider at the largest batch).

    python -m bench.plot bench/results/h100
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections import defaultdict

if __package__ in (None, ""):  # run as a file: make `bench` importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.report import read_rows  # noqa: E402

BASELINE = "eager_channels_last"


def _value(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _bars(ax, layers: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(layers))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=90, fontsize=6)
    ax.legend(fontsize=7)


def plot_op(csv_path: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path) if r["status"] == "ok"]
    written = []
    by_mode: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_mode[r["mode"]].append(r)
    for mode, rs in by_mode.items():
        layers = list(dict.fromkeys(r["layer"] for r in rs))
        providers = list(dict.fromkeys(r["provider"] for r in rs))
        table = {(r["layer"], r["provider"]): r for r in rs}
        first = rs[0]
        title = (f"{first['op']} {mode}, batch {first['batch']}, {first['dtype']}, {first['device']}, "
                 f"commit {first['commit'][:10]}")
        for kind, column, ylabel in (("speedup", f"speedup_vs_{BASELINE}", f"speedup over {BASELINE} (x)"),
                                     ("bandwidth", "pct_copy_bw", "% of measured copy bandwidth")):
            names = [p for p in providers if p != BASELINE or kind == "bandwidth"]
            if kind == "speedup":
                names = [p for p in names if p != "copy"]
            series = {p: [(_value(table[(layer, p)][column]) if (layer, p) in table else None) or 0.0
                          for layer in layers] for p in names}
            if not any(any(v) for v in series.values()):
                continue
            fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers)), 4.5))
            _bars(ax, layers, series)
            if kind == "speedup":
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=8)
            fig.tight_layout()
            path = out / f"{first['op']}_{mode}_{kind}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def plot_models(csv_path: pathlib.Path, out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path) if r["status"] == "ok"]
    if not rows:
        return []
    batch = max(int(r["batch"]) for r in rows)
    rows = [r for r in rows if int(r["batch"]) == batch]
    groups = list(dict.fromkeys(f"{r['model']} {r['task']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    table = {(f"{r['model']} {r['task']}", r["provider"]): _value(r["images_per_s"]) or 0.0 for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups)), 4.5))
    _bars(ax, groups, {p: [table.get((g, p), 0.0) for g in groups] for p in providers})
    ax.set_ylabel("images/s")
    ax.set_title(f"models, batch {batch}, autocast {rows[0]['autocast']}, {rows[0]['device']}", fontsize=8)
    fig.tight_layout()
    path = out / "models_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="directory holding the CSVs (plots are written beside them)")
    args = p.parse_args(argv)
    d = pathlib.Path(args.results)
    written: list[pathlib.Path] = []
    for op in ("dwconv_bn_act", "squeeze_excite"):
        if (d / f"{op}.csv").exists():
            written += plot_op(d / f"{op}.csv", d)
    if (d / "models.csv").exists():
        written += plot_models(d / "models.csv", d)
    for path in written:
        print(path)
    if not written:
        print(f"no plots: no usable rows in CSVs under {d}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
