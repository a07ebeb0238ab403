"""All attention benchmarks in one go: prefill / vision (bench_attention_prefill.py) and decode
over the KV cache (bench_attention_decode.py), each with its own baselines and ceilings.

    python bench/ops/bench_attention.py [--quick]

``--quick`` runs the shorter sweeps (8k prefill, 8k decode); arguments for one part go to that
script directly.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    runs = [
        ("bench_attention_prefill.py", ["--lengths", "8192"] if args.quick else []),
        ("bench_attention_decode.py", ["--ctx", "8192"] if args.quick else []),
    ]
    rc = 0
    for script, extra in runs:
        print(f"== {script} {' '.join(extra)}", flush=True)
        rc |= subprocess.call([sys.executable, os.path.join(HERE, script), *extra])
    sys.exit(rc)


if __name__ == "__main__":
    main()
