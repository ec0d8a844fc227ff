"""Write summary.md for a GPU run directory made by scripts/gpu_run.sh (printed to stdout)."""

from __future__ import annotations

import pathlib
import re
import sys
import xml.etree.ElementTree as ET


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
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    if m is None:
        return "no sanitizer summary (see log)"
    return "clean" if m.group(1) == "0" else f"{m.group(1)} errors"


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
    print(f"- CUDA-marked tests: {junit_counts(d / 'junit_cuda.xml')}")
    print(f"- rest of the suite (time-boxed, stops at first failure): {junit_counts(d / 'junit_rest.xml')}\n")
    print("## compute-sanitizer over every CUDA kernel (scripts/sanitize_kernels.py)\n")
    for tool in ("memcheck", "racecheck"):
        print(f"- {tool}: {sanitizer_verdict(d / f'sanitizer_{tool}.log')}")
    print("\n## Profile: MobileNetV3-Large, batch 256, bf16, channels_last\n")
    for mode in ("eval", "train"):
        print(f"### {mode}\n\n```\n{read(f'profile_v3_large_{mode}.txt')}\n```\n")


if __name__ == "__main__":
    main(sys.argv[1])
