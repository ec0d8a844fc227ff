"""Write summary.md for a GPU run directory made by scripts/gpu_run.sh (printed to stdout)."""

from __future__ import annotations

import pathlib
import re
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import report  # noqa: E402  (standard library only)

TQDM_LINE = re.compile(r"\d+/\d+ \[[0-9:<?]+")


def junit_counts(path: pathlib.Path) -> str:
    if not path.exists():
        return "did not run (no junit file)"
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return f"{total - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped (of {total})"


def sanitizer_verdict(path: pathlib.Path) -> str:
    if not path.exists():
        return "did not run"
    text = path.read_text(errors="replace")
    m = re.search(r"(?:ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: \d+ hazards displayed \((\d+) error)", text)
    if m is None:
        return "no sanitizer summary (see log)"
    errors = m.group(1) or m.group(2)
    return "clean" if errors == "0" else f"{errors} errors"


def main(out: str) -> None:
    d = pathlib.Path(out)
    read = lambda name: (d / name).read_text(errors="replace").strip() if (d / name).exists() else "(missing)"  # noqa: E731
    print("# GPU run summary\n")
    dirty = (d / "git-status.txt").exists() and bool((d / "git-status.txt").read_text().strip())
    print(f"- commit: `{read('commit.txt')}` (uncommitted changes: {'yes' if dirty else 'no'})")
    smi = read("nvidia-smi.txt")
    driver = re.search(r"Driver Version: (\S+)", smi)
    print(f"- driver: {driver.group(1) if driver else 'unknown'}")
    print(f"- statuses: `{' '.join(read('status.env').split())}`\n")
    print("## Environment (python -m mnet_ext.info)\n\n```\n" + read("info.txt") + "\n```\n")
    print("## Tests\n")
    for group, what in (("layers", "every MobileNet layer"), ("backend", "CUDA backend primitives"),
                        ("rest", "odd shapes, SE, compile, graphs, models")):
        print(f"- CUDA-marked tests, {what}: {junit_counts(d / f'junit_cuda_{group}.xml')}")
    print(f"- rest of the suite (time-boxed, stops at first failure): {junit_counts(d / 'junit_rest.xml')}\n")
    print("## compute-sanitizer over every CUDA kernel (scripts/sanitize_kernels.py)\n")
    for tool in ("memcheck", "racecheck"):
        print(f"- {tool}: {sanitizer_verdict(d / f'sanitizer_{tool}.log')}")
    print("\n## Profile: MobileNetV3-Large, batch 256, bf16, channels_last\n")
    for mode in ("eval", "train"):
        # tqdm's progress lines are noise in a summary
        text = "\n".join(ln for ln in read(f"profile_v3_large_{mode}.txt").splitlines() if not TQDM_LINE.search(ln))
        print(f"### {mode}\n\n```\n{text}\n```\n")
    bench_section(d)


def bench_section(d: pathlib.Path) -> None:
    """Headline of the benchmarks in d/bench: geomean speedups per model and mode, % of copy bandwidth."""
    bench = d / "bench"
    print("## Benchmarks (bench/)\n")
    if not bench.is_dir():
        print("did not run (no bench directory)\n")
        return
    for op in ("dwconv_bn_act", "squeeze_excite"):
        path = bench / f"{op}.csv"
        if not path.exists():
            print(f"### {op}: no CSV (see bench/{op}.log)\n")
            continue
        rows = report.read_rows(path)
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "error")}
        first = rows[0] if rows else {}
        print(f"### {op}\n\n{len(rows)} rows ({counts}); batch {first.get('batch')}, {first.get('dtype')}, "
              f"{first.get('device')}; copy bandwidth {first.get('copy_peak_gbps', '?')} GB/s; "
              f"{first.get('timing', '')}\n")
        print("Geomean speedup over the model's unique layers; % copy bw = sum of the bytes each mode must move / "
              "sum of times, over the measured copy bandwidth.\n")
        print(report.markdown(report.headline(rows)))
        errors = sorted({(r["provider"], r["mode"], r["reason"][:120]) for r in rows if r["status"] == "error"})
        for provider, mode, reason in errors[:10]:
            print(f"- error: {provider} {mode}: {reason}")
        print()
    path = bench / "models.csv"
    if path.exists():
        cols = ["model", "task", "batch", "provider", "status", "ms", "images_per_s", "speedup_vs_eager",
                "peak_mem_mb", "reason"]
        rows = report.read_rows(path)
        print("### models (end to end)\n\n" + report.markdown([{c: r.get(c, "") for c in cols} for r in rows], cols))
    else:
        print("### models: no CSV (see bench/models.log)\n")


if __name__ == "__main__":
    main(sys.argv[1])
