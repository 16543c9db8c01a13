"""The quality benchmark: every method on the shapes pairs at one equal budget (``kdcli bench quality``).

    python benchmarks/quality.py --pairs fcos --budget 2e --seeds 3 --out runs/bench-quality

A thin wrapper: every option is ``kdcli bench quality``'s (see ``kdcli bench quality --help`` and
:mod:`kdcli.bench.quality`); the latest committed table is docs/results/quality.md.
"""

from __future__ import annotations

import sys

from kdcli.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "bench", "quality", *sys.argv[1:]]  # the CLI's options, errors and exit codes
    main()
