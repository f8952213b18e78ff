"""Guard (not a CI test): run the tokenize benchmark, exit 1 when its a/b end to end is below 0.9.

(a) is the Ray pipeline, (b) the plain batched loop on the same cores; `--min-ratio` moves the bar.

    python -m benchmarks.check_tokenize [--min-ratio 0.9] [benchmark flags]

(benchmark flags start from the issue-38 measurement, --clips 384 --images 8 --batch-size 4; a flag
given again overrides it)

Prints the benchmark's whole report (rates, ratios, the pipeline's per-stage table, machine, load,
commit), then one verdict line. Run it on an otherwise idle machine: the loads of other jobs move
(a) and (b) differently, so a loaded run says little (the report prints the load average).
"""
from __future__ import annotations

import os
import sys

# Run as a script, this file's folder would come first on sys.path and shadow the stdlib `tokenize`.
if sys.path and sys.path[0] and __file__.startswith(sys.path[0]):
    sys.path[0] = os.path.dirname(sys.path[0])  # the repository root instead: `benchmarks` imports
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the benchmark's documented setting, before torch loads

DEFAULT = ["--clips", "384", "--images", "8", "--batch-size", "4"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    from benchmarks.tokenize import main as bench

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--min-ratio", type=float, default=0.9, help="fail below this a/b end-to-end ratio")
    a, rest = ap.parse_known_args(argv)
    res = bench(DEFAULT + rest)  # a flag given again overrides its default
    ratio = res["ratio_a_over_b"]
    ok = ratio >= a.min_ratio
    print(f"check_tokenize: {'PASS' if ok else 'FAIL'}: a/b end to end {ratio:.2f} "
          f"{'>=' if ok else '<'} {a.min_ratio} (load average before {res['load_avg_before'][0]:.2f}, "
          f"after {res['load_avg_after'][0]:.2f}; commit {res['commit']})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
