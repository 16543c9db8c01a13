"""Time one distillation step per method against the floor (teacher inference + plain student step).

    python benchmarks/step_time.py --threads 1 --clock cpu --steps 21

A script form of ``kdcli bench speed`` (:mod:`kdcli.bench.speed`, one implementation): untrained
models, one random batch, floor and method steps interleaved (A B B A ...) so both parts of a ratio
see the same machine load; "vs floor" is the median of the per-pair ratios, q25–q75 their quartiles.
``--clock cpu`` times with the process's CPU time (steadier on a shared machine; use ``--threads 1``).
Prints the Markdown table; ``--out DIR`` also writes speed.md and speed.csv there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdcli.bench.speed import SpeedOptions, markdown, run_speed


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--teacher", default="shapes-r34-fcos")
    ap.add_argument("--student", default="shapes-r18-fcos")
    ap.add_argument("--size", default="128", help="H (square) or HxW, e.g. 800x1333")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15, help="timed floor/method pairs")
    ap.add_argument("--amp", default="auto", choices=["none", "bf16", "auto"])
    ap.add_argument("--methods", default="all")
    ap.add_argument("--device", default="cpu", choices=["all", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--memory", action="store_true", help="also the step memory of each method vs the floor")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    opts = SpeedOptions(teacher=a.teacher, student=a.student, size=a.size, batch=a.batch, steps=a.steps,
                        amp=a.amp, methods=a.methods, device=a.device, clock=a.clock, threads=a.threads,
                        memory=a.memory, out=a.out, command="python " + " ".join(sys.argv))
    res = run_speed(opts, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(opts, res.rows), end="")


if __name__ == "__main__":
    main()
