"""Speed and memory of surm's adapters next to PEFT's: the same as ``surm bench`` (see ``surm bench --help``).

    python benchmarks/bench.py --threads 2 --output docs/results/bench_cpu.md
"""

import sys

from surm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
