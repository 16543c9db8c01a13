"""``kdcli bench quality`` and ``kdcli bench speed``: parse options and call :mod:`kdcli.bench`."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_options import _O
from .cli_options import command_line as _command_line
from .cli_options import echo_err as _echo
from .config import RECIPES
from .errors import ConfigError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: every method's quality at one budget; step time.")
_SHAPES = RECIPES["shapes"]


@bench_app.command("quality", help="Every applicable method on one student at an equal budget over seeds; tables, "
                   "plot, ranking.\n\nRecipe: the demo's shapes recipe (AdamW, lr 1e-3, weight decay 1e-4, 50 "
                   "warm-up steps, --amp auto; cosine, poly for segmentation), with which short runs from scratch "
                   "converge (docs/cli.md#recipes).")
def bench_quality(
    teacher: str = _O(None, "--teacher", "-t", help="your teacher (zoo name, run or export folder); with --student"),
    student: str = _O(None, "--student", "-s", help="your student; without the pair: the shapes suite (--pairs)"),
    pairs: str = _O("all", help="shapes suite pairs: all or some of fcos,retina,deeplabv3,lraspp"),
    teacher_epochs: int = _O(0, help="epochs to train an untrained zoo teacher once (0: 16 detection, 8 segm.)"),
    data: str = _O("shapes", help="shapes | coco:/path | cityscapes:/path | semantic:/path | data file"),
    method: str = _O("all", "--method", help="all, or a+b+c (a,b,c too; the baseline always runs)"),
    methods: str = _O(None, "--methods", hidden=True),  # the old name of --method
    budget: str = _O("2e", help="per run, equal for every method: epochs (2e) or optimizer steps (300)"),
    seeds: int = _O(3), out: Path = _O(Path("runs/bench-quality"), help="suite folder (reruns reuse its runs)"),
    batch_size: int = _O(8, "--batch-size", "-b"), lr: float = _O(_SHAPES["lr"]),
    optimizer: str = _O(_SHAPES["optimizer"]),
    amp: str = _O(_SHAPES["amp"], help="none | bf16 | fp16 | auto (bf16 where the hardware has native bf16)"),
    image_size: int = _O(0), max_train_images: int = _O(0),
    max_val_images: int = _O(0), device: str = _O("auto"), workers: int = _O(2),
    student_weights: str = _O(None, help="zoo | backbone | FILE (default: from scratch)"),
    isolate: bool = _O(True, "--isolate/--in-process", help="one child process per run (its own peak memory)"),
    jobs: int = _O(1, help="runs at once, each with cores/jobs threads (CPU: 2 often beats 1)"),
    reference: Path = _O(None, help="quality.csv of another suite: Kendall tau between the two rankings"),
    suite: str = _O("", help="evidence: the fixed paper-like suite (docs/results/evidence.md); ablation: its "
                    "methods' ablations (reuses the evidence runs in --out; --method picks the parents, --pairs "
                    "the pair: fcos or lraspp, --seeds applies); --out, --device, --workers apply, their own "
                    "pairs, seeds and budgets"),
    keep: str = _O("best", "--keep", help="what each finished run keeps: best | last | all"),
) -> None:
    if suite:
        if suite not in ("evidence", "ablation"):
            raise ConfigError(f"--suite {suite}: expected evidence or ablation")
        ev_out = Path("runs/bench-evidence") if out == Path("runs/bench-quality") else out
        if suite == "ablation":
            from .bench.ablation import AblationOptions, run_ablation, variants_of

            files = run_ablation(AblationOptions(out=ev_out, pair="fcos" if pairs == "all" else pairs,
                                                 device=device, workers=workers,
                                                 variants=variants_of(methods or method), seeds=seeds,
                                                 command=_command_line()), log=_echo)
            typer.echo(f"wrote {', '.join(str(p) for p in files)}")
            return
        from .bench.evidence import EvidenceOptions, run_evidence

        res = run_evidence(EvidenceOptions(out=ev_out, device=device, workers=workers,
                                           command=_command_line()), log=_echo)
        typer.echo(f"wrote {', '.join(str(p) for p in res.files)} ({res.wall_s / 60:.1f} min)")
        return
    from rich.console import Console

    from .bench.plan import CAVEAT, QualityOptions, choose_pairs
    from .bench.quality import run_suite
    from .bench.quality_report import ranked_table

    chosen = choose_pairs(teacher, student, pairs, teacher_epochs)
    methods = (methods or method).replace("+", ",")
    opts = QualityOptions(chosen, data=data, methods=methods, budget=budget, seeds=seeds, out=out,
                          batch_size=batch_size, lr=lr, optimizer=optimizer, amp=amp, image_size=image_size,
                          max_train_images=max_train_images, max_val_images=max_val_images, device=device,
                          workers=workers, student_weights=student_weights, isolate=isolate, jobs=jobs,
                          reference=reference, command=_command_line(), keep=keep)
    res = run_suite(opts, log=_echo)
    console = Console(soft_wrap=False)
    for pair in chosen:
        console.print(ranked_table(res.rows, pair))
    typer.echo(f"caveat: {CAVEAT}")
    typer.echo(f"wrote {', '.join(str(p) for p in res.files)} ({res.wall_s / 60:.1f} min)")


@bench_app.command("speed")
def bench_speed(
    teacher: str = _O("shapes-r34-fcos", "--teacher", "-t"), student: str = _O("shapes-r18-fcos", "--student", "-s"),
    image_size: str = _O("128", "--image-size", help="input size: H (square) or HxW, e.g. 800x1333"),
    batch_size: int = _O(8, "--batch-size", "-b"), steps: int = _O(10, help="timed pairs"),
    warmup: int = _O(2, help="untimed pairs first (1 suffices for real sizes on a CPU)"),
    channels_last: bool = _O(False, "--channels-last/--no-channels-last", help="NHWC models and inputs"),
    compile_: bool = _O(False, "--compile/--no-compile", help="torch.compile student and teacher (keep --warmup)"),
    size: str = _O(None, "--size", hidden=True), batch: int = _O(None, "--batch", hidden=True),  # old names
    amp: str = _O("auto", help="none | bf16 | auto (bf16 where the hardware has native bf16)"),
    method: str = _O("all", "--method", help="all, or a+b+c (a,b,c too)"),
    methods: str = _O(None, "--methods", hidden=True),  # the old name of --method
    device: str = _O("all", help="all (CPU, and CUDA when available) | cpu | cuda"),
    clock: str = _O("wall", help="wall | cpu (process CPU time: steadier on a shared machine, with --threads 1)"),
    threads: int = _O(0, help="torch.set_num_threads (0: default)"),
    memory: bool = _O(True, "--memory/--no-memory", help="also the step memory of each method vs the floor"),
    set_: list[str] = _O(None, "--set", help="method option method.key=value (key=value with one method)"),
    out: Path = _O(None, help="folder for speed.md and speed.csv"),
) -> None:
    """Per method: one training step vs the floor (teacher inference + plain student step), and memory."""
    from .bench.speed import SpeedOptions, markdown, run_speed
    from .config import parse_sets

    size = image_size if size is None else size
    batch = batch_size if batch is None else batch
    methods = (methods or method).replace("+", ",")
    opts = SpeedOptions(teacher=teacher, student=student, size=size, batch=batch, steps=steps, warmup=warmup,
                        channels_last=channels_last, compile=compile_, amp=amp,
                        methods=methods, device=device, clock=clock, threads=threads, memory=memory,
                        sets=parse_sets(set_), out=out, command=_command_line())
    res = run_speed(opts, log=_echo)
    typer.echo(markdown(opts, res.rows))
    if res.files:
        typer.echo(f"wrote {', '.join(str(p) for p in res.files)}")
