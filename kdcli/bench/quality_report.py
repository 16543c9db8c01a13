"""What a quality suite writes: CSV tables, ``quality.md`` (tables, command, versions, machine) and the
bar plot ``quality.png``."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .plan import BASELINE, CAVEAT, METRICS, Budget, Pair, QualityOptions, SuiteResult
from .ranking import CONTRAST_COLUMNS, QUALITY_COLUMNS
from .stats import ALPHA


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    keys = columns or list(dict.fromkeys(k for r in rows for k in r))
    keys += [k for k in dict.fromkeys(k for r in rows for k in r) if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, ""), 5) for k in keys})
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", GPU {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - the description is informative only
        pass
    return text


def _loadavg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return math.nan


def markdown(opts: QualityOptions, res: SuiteResult, teachers: dict[str, tuple[str, dict[str, Any]]],
             plans: dict[str, tuple[str, list[str], Budget]], agreement: dict[str, tuple[float, int]],
             load: tuple[float, float]) -> str:
    from ..engine.record import versions

    v = versions()
    lines = ["# Quality benchmark (`kdcli bench quality`)", ""]
    if opts.command:
        lines += ["```", opts.command, "```", ""]
    lines += [
        f"- versions: kdcli {v['kdcli']}, torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}, "
        f"Python {v['python']}",
        f"- machine: {machine()}; load average {load[0]} at the start, {load[1]} at the end",
        f"- data: `{opts.data}`; seeds {', '.join(map(str, range(opts.seeds)))}; batch {opts.batch_size}, "
        f"{opts.optimizer} lr {opts.lr:g}, amp {opts.amp}, image size {opts.image_size or 'the model default'}",
        f"- wall time: {res.wall_s / 60:.1f} min for this invocation (teachers from cache or trained); the runs "
        f"themselves took {sum(r['run_s'] for r in res.runs if not math.isnan(r['run_s'])) / 60:.1f} min in all "
        "(runs reused from an earlier invocation count with their original time)"
        + (f"; {opts.jobs} runs at a time, so each run's times include sharing the machine with the others"
           if opts.jobs > 1 else ""),
        "- every method: same student, same recipe, same budget and seeds; validation once after the last epoch; "
        "gain = mean over seeds of (method − baseline of the same seed) ± std (± only with 2+ seeds); "
        f"*beats baseline*: a one-sided paired t-test (same seed; n − 1 degrees of freedom) of gain > 0, \"yes\" "
        f"when its p-value after Holm's correction over every test of this suite (each method on each pair and the "
        f"method-against-method contrasts) is at most {ALPHA}; *p (Holm)*: that corrected p-value; one seed is "
        "never a test; *distill/task loss*: the distillation terms over the "
        "task terms in the first epoch's mean losses (≫ 1: the method's official weight dominates the task here)",
        "",
    ]
    for pair in opts.pairs:
        task, names, budget = plans[pair.name]
        a, b = METRICS[task]
        t_ref, t_metrics = teachers[pair.name]
        rows = [r for r in res.rows if r["pair"] == pair.name]
        lines += [f"## {pair.name}: {pair.teacher} → {pair.student} ({task})", "",
                  f"Teacher {a} {_fmt(float(t_metrics.get(a, math.nan)))} (`{t_ref}`). Budget: {budget.text} of "
                  f"batch {opts.batch_size}; {len(names) - 1} methods.", ""]
        lines += [f"| rank | method | {a} | {b} | gain {a} | p (Holm) | beats baseline | distill/task loss "
                  "| run s | train s | peak MB |", "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in rows:
            pm = r["seeds"] > 1  # a spread needs two seeds
            ms = (f"{_fmt(r['mean'])} ± {_fmt(r['std'])}" if pm else _fmt(r["mean"])) if r["seeds"] else "failed"
            mb = (f"{_fmt(r[f'{b}_mean'])} ± {_fmt(r[f'{b}_std'])}" if pm else _fmt(r[f"{b}_mean"])) \
                if r["seeds"] else ""
            gain = "—"
            if r["method"] != BASELINE and not math.isnan(r["gain"]):
                gain = f"{r['gain']:+.4f} ± {_fmt(r['gain_std'])}" if pm else f"{r['gain']:+.4f}"
            name = f"**{r['method']}**" if r["method"] == BASELINE else r["method"]
            if r["failed"]:
                name += f" ({r['failed']} failed)"
            ratio = "—" if r["method"] == BASELINE else _fmt(r["loss_ratio"], 2)
            lines.append(f"| {r['rank']} | {name} | {ms} | {mb} | {gain} | {_fmt(r.get('p_holm', math.nan), 3)} "
                         f"| {r['verdict']} | {ratio} "
                         f"| {_fmt(r['run_s'], 1)} | {_fmt(r['train_s'], 1)} | {_fmt(r['peak_mem_mb'], 0)} |")
        losers = [r["method"] for r in rows if r["method"] != BASELINE and r["seeds"]
                  and not str(r["verdict"]).startswith("yes")]
        if losers:
            lines += ["", f"Not beating the baseline here: {', '.join(losers)}."]
        failed = [r["method"] for r in rows if not r["seeds"]]
        if failed:
            lines += ["", f"Failed in every seed (see the list below): {', '.join(failed)}."]
        if pair.name in agreement:
            tau, n = agreement[pair.name]
            tau_text = "undefined (the scores tie)" if math.isnan(tau) else f"{tau:.2f}"
            lines += ["", f"Ranking agreement with the reference suite (`{opts.reference}`): Kendall τ-b = "
                          f"{tau_text} over {n} common methods (ties count as neither agreement nor "
                          "disagreement)."]
        versus = [c for c in res.contrasts if c["pair"] == pair.name]
        if versus:
            lines += ["", f"Method against method (paired by seed, one-sided: the first beats the second in {a}):",
                      "", "| method | versus | seeds | mean difference | t | p | p (Holm) | first beats second |",
                      "|---|---|---:|---:|---:|---:|---:|---|"]
            lines += [f"| {c['method']} | {c['versus']} | {c['seeds']} | {c['diff']:+.4f} | {_fmt(c['t'], 2)} "
                      f"| {_fmt(c['p'], 3)} | {_fmt(c['p_holm'], 3)} | {c['verdict']} |" for c in versus]
        mem = rows[0]["mem_kind"] if rows else ""
        lines += ["", f"Memory: {mem}.", ""]
    for r in res.runs:
        if r["status"] != "ok":
            lines.append(f"- failed: {r['pair']} {r['method']} seed {r['seed']}: {r['status']}")
    lines += ["", "**Caveat.** " + CAVEAT, ""]
    return "\n".join(lines)


def bar_figure_size(n_pairs: int, n_methods: int) -> tuple[float, float]:
    """Inches of ``quality.png``: 6 wide per pair, 0.3 per method bar plus margins."""
    return 6.0 * n_pairs, 1.6 + 0.3 * n_methods


def bar_plot(path: Path, rows: list[dict[str, Any]], pairs: list[Pair], dpi: int = 100) -> Path:
    """Horizontal bars of the main metric per method (± std), baseline (dashed) and teacher (dotted) lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per = {p.name: [r for r in rows if r["pair"] == p.name and not math.isnan(r["mean"])] for p in pairs}
    n_methods = max([len(v) for v in per.values()] + [1])
    fig = Figure(figsize=bar_figure_size(len(pairs), n_methods), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    for ax, pair in zip(axes, pairs, strict=True):
        data = sorted(per[pair.name], key=lambda r: r["mean"])
        names = [r["method"] for r in data]
        base = next((r["mean"] for r in data if r["method"] == BASELINE), math.nan)
        colours = ["0.55" if n == BASELINE else "tab:green" if r["mean"] > base else "tab:red" if r["mean"] < base
                   else "0.8" for n, r in zip(names, data, strict=True)]  # above / below / equal to the baseline
        ax.barh(range(len(data)), [r["mean"] for r in data], xerr=[r["std"] for r in data], color=colours,
                capsize=2)
        ax.set_yticks(range(len(data)))
        ax.set_yticklabels(names, fontsize=8)
        if not math.isnan(base):
            ax.axvline(base, color="0.3", linestyle="--", linewidth=1, label="baseline")
        teacher = data[0]["teacher_score"] if data else math.nan
        if not math.isnan(teacher):
            ax.axvline(teacher, color="k", linestyle=":", linewidth=1, label="teacher")
        metric = data[0]["metric"] if data else ""
        ax.set_xlabel(f"{metric} (mean ± std over seeds)")
        ax.set_title(f"{pair.name}: {pair.teacher} → {pair.student}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    return path


def write_outputs(out: Path, opts: QualityOptions, res: SuiteResult, teachers: dict[str, tuple[str, dict[str, Any]]],
                  plans: dict[str, tuple[str, list[str], Budget]], agreement: dict[str, tuple[float, int]],
                  load: tuple[float, float]) -> list[Path]:
    files = [write_csv(out / "quality.csv", res.rows, list(QUALITY_COLUMNS)),
             write_csv(out / "runs.csv", res.runs),
             write_csv(out / "contrasts.csv", res.contrasts, list(CONTRAST_COLUMNS))]
    md = out / "quality.md"
    md.write_text(markdown(opts, res, teachers, plans, agreement, load))
    files.append(md)
    files.append(bar_plot(out / "quality.png", res.rows, opts.pairs))
    (out / "options.json").write_text(json.dumps({**asdict(opts), "pairs": [asdict(p) for p in opts.pairs]},
                                                 indent=1, default=str))
    return files


def ranked_table(rows: list[dict[str, Any]], pair: Pair) -> Any:
    """One pair's methods, ranked, for the terminal (MB: peak memory): no borders between columns, so that the longest
    verdict ("untested (1 seed, +)") still fits 80 columns on one line per method."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"{pair.name}: {pair.teacher} -> {pair.student} (ranked)", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, title_justify="left")
    for col in ("#", "method", "score ± std", "gain", "beats baseline", "run s", "MB"):
        table.add_column(col, justify="left" if col in ("method", "beats baseline") else "right", no_wrap=True)
    for r in (r for r in rows if r["pair"] == pair.name):
        if not r["seeds"]:
            table.add_row("", r["method"], "failed", "", "", "", "")
            continue
        table.add_row(str(r["rank"]), r["method"], f"{r['mean']:.4f} ± {r['std']:.4f}",
                      "—" if r["method"] == BASELINE else f"{r['gain']:+.4f}", str(r["verdict"]),
                      f"{r['run_s']:.0f}", f"{r['peak_mem_mb']:.0f}")
    return table
