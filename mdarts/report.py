"""The table and the plot of an experiment's ``summary.json`` (see :mod:`mdarts.experiment`), and
the validation table of its finished trainings while it runs (``mdarts experiment --status``).

``table.md``: per arm the mean +- standard deviation over its runs of test BLEU, lowercased
BLEU and chrF, the parameters, then every run, then the targets (:func:`targets`).
``bleu.png``: the test BLEU of each random genotype as a distribution, with every other arm's
runs marked beside it.
"""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path
from typing import Optional

from .files import write_atomic


def mean_std(values: list[float], digits: int = 2) -> str:
    """``"mean +- std"`` (the sample standard deviation; just the value for one run)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def cost(arm: dict) -> str:
    """What an arm cost, in hours of one core (its one-thread processes' wall time): all its
    searches and every retrain it ran, ``"total (search + retrains)"``."""
    if "train_minutes" not in arm:  # a summary written before the report counted it
        return ""
    search, train = arm["search_minutes"] / 60.0, arm["train_minutes"] / 60.0
    return f"{search + train:.1f} ({search:.1f} + {train:.1f})"


def table(summary: dict) -> str:
    """The markdown table of ``summary`` (arms, then every run)."""
    lines = [
        f"Experiment {summary['name']}: {summary['pair']}, {summary['split']} (finalist runs of every training seed)",
        "",
        "| arm | kind | runs | BLEU | lc BLEU | chrF | parameters (non-embedding) | core-hours: search + retrains |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in summary["arms"]:
        finals = [run for run in arm["runs"] if run["finalist"]] or arm["runs"]
        params = sorted({(run["params"], run["non_embedding_params"]) for run in finals})
        shown = ", ".join(f"{total:,} ({inner:,})" for total, inner in params[:2]) + (" ..." if len(params) > 2 else "")
        cells = [mean_std([run[key] for run in finals]) for key in ("bleu", "lc_bleu", "chrf")]
        lines.append(f"| {arm['name']} | {arm['kind']} | {len(finals)} | {' | '.join(cells)} | {shown} | {cost(arm)} |")
    lines += ["", "| arm | network | seed | BLEU | lc BLEU | chrF | valid loss | parameters | minutes | genotype |"]
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for arm in summary["arms"]:
        for run in arm["runs"]:
            genotype = (run["genotype"] or "").replace("\n", " / ")
            lines.append(
                f"| {arm['name']} | {run['member']} | {run['seed']} | {run['bleu']:.2f} | {run['lc_bleu']:.2f} | "
                f"{run['chrf']:.2f} | {run['valid_loss']:.3f} | {run['params']:,} | {run['minutes']:.1f} | {genotype} |"
            )
    if compared := targets(summary):
        lines += ["", *compared]
    if checks := selector_lines(summary.get("selectors", [])):
        lines += ["", *checks]
    lines += ["", "Scores (sacreBLEU signatures):", ""]
    lines += [f"- {label}: `{signature}`" for label, signature in summary.get("signatures", {}).items()]
    return "\n".join(lines) + "\n"


SEARCHING_KINDS = ("searched", "weight_sharing")
"""The arm kinds that search (``mdarts.experiment.SEARCH_PARTS``): the methods the targets judge."""


def targets(summary: dict, margin: float = 0.5) -> list[str]:
    """The comparisons the experiment exists for, in test BLEU, as markdown lines, for every
    searching arm (:data:`SEARCHING_KINDS`): its mean at the first training seed against the
    median of the ``random`` arm's genotypes (each trained with that seed only) plus ``margin``,
    and its mean over every training seed against the ``transformer`` arm's and the ``evolved``
    arm's (all train every seed). An arm missing from ``summary`` leaves its comparison out."""
    first = summary["train_seeds"][0]

    def bleu(arm: dict, seed: Optional[int] = None) -> list[float]:
        return [run["bleu"] for run in arm["runs"] if seed is None or run["seed"] == seed]

    def verdict(difference: float, target: float) -> str:
        return "met" if difference >= target else f"missed by {target - difference:.2f}"

    kinds: dict[str, list[dict]] = {}
    for arm in summary["arms"]:
        kinds.setdefault(arm["kind"], []).append(arm)
    lines = ["Targets (test BLEU):", ""]
    for searching in (arm for arm in summary["arms"] if arm["kind"] in SEARCHING_KINDS):
        mine = bleu(searching, first)
        for random_arm in kinds.get("random", []):
            theirs = bleu(random_arm, first)
            ours, median = statistics.mean(mine), statistics.median(theirs)
            lines.append(
                f"- {searching['name']} >= median of {random_arm['name']} + {margin:.2f} (training seed {first}): "
                f"mean {ours:.2f} of {len(mine)} against median {median:.2f} of {len(theirs)}, "
                f"{ours - median:+.2f}: {verdict(ours - median, margin)}"
            )
        for baseline in kinds.get("transformer", []) + kinds.get("evolved", []):
            mine, theirs = bleu(searching), bleu(baseline)
            ours, baseline_mean = statistics.mean(mine), statistics.mean(theirs)
            lines.append(
                f"- {searching['name']} >= {baseline['name']} (every training seed): mean {ours:.2f} "
                f"of {len(mine)} runs against {baseline_mean:.2f} of {len(theirs)}, {ours - baseline_mean:+.2f}: "
                f"{verdict(ours - baseline_mean, 0.0)}"
            )
    return lines if len(lines) > 2 else []


def validation_table(finished: list[dict]) -> str:
    """The markdown tables of an experiment's finished trainings, before its report: per arm the
    validation loss (mean +- std over its trainings), then every training. ``finished``: a
    training's record (``mdarts.experiment``) with its ``arm`` and ``member`` names."""
    arms = list(dict.fromkeys(run["arm"] for run in finished))
    lines = [
        "Finished trainings, validation loss (label-smoothed, the best of the run; the test split is scored "
        "once, when every run is done):",
        "",
        "| arm | trainings | validation loss |",
        "|---|---:|---:|",
    ]
    for arm in arms:
        losses = [run["valid_loss"] for run in finished if run["arm"] == arm]
        lines.append(f"| {arm} | {len(losses)} | {mean_std(losses, 3)} |")
    lines += ["", "| arm | network | training seed | validation loss | parameters (non-embedding) | size | minutes |"]
    lines.append("|---|---|---:|---:|---:|---|---:|")
    for arm in arms:
        for run in (run for run in finished if run["arm"] == arm):
            lines.append(
                f"| {arm} | {run['member']} | {run['seed']} | {run['valid_loss']:.3f} | "
                f"{run['params']:,} ({run['non_embedding_params']:,}) | d {run['d_model']}, e {run['embed_dim']} | "
                f"{run['minutes']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def selector_lines(checks: list[dict], target: float = 0.6) -> list[str]:
    """Each search's selector against the retrained references (``mdarts.experiment``'s
    ``_selector_check`` rows), one line per search, then the mean per arm against ``target``,
    then the baselines that need no search (rows whose arm is None); [] for no rows."""
    if not checks:
        return []
    lines = [
        f"Each search's selector against the retrains of the {checks[0]['references']} references (random and "
        "control genotypes): Spearman of its score and the validation loss (+1: it orders them as the retrains do)",
        "",
    ]
    searches = [c for c in checks if c["arm"] is not None]
    lines += [f"- {c['arm']} {c['member']} ({c['selector']}): {c['spearman']:+.2f}" for c in searches]
    for arm in dict.fromkeys(c["arm"] for c in searches):
        values = [c["spearman"] for c in searches if c["arm"] == arm]
        verdict = "met" if statistics.mean(values) >= target else "missed"
        lines.append(f"- {arm}, over its {len(values)} searches: {mean_std(values)} (target {target:+.2f}: {verdict})")
    for c in checks:
        if c["arm"] is None:
            rho = "none, every one is of the same width" if math.isnan(c["spearman"]) else f"{c['spearman']:+.2f}"
            lines.append(f"- no search, the width each was sized to (wider better; {c['selector']}): {rho}")
    return lines


def ranks(values: list[float]) -> list[float]:
    """1-based ranks of ``values``, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (ties ranked by their mean rank;
    NaN when either list holds a single value, which orders nothing)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    spread = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / spread if spread else float("nan")


def plot(summary: dict) -> bytes:
    """PNG: the random genotypes' test BLEU (first training seed) as a distribution, and every
    run as a mark, one row per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    figure, axis = plt.subplots(figsize=(7, 1.0 + 0.5 * len(arms)))
    for row, arm in enumerate(arms):
        values = [run["bleu"] for run in arm["runs"]]
        first = [run["bleu"] for run in arm["runs"] if run["seed"] == summary["train_seeds"][0]]
        if arm["kind"] == "random" and len(first) > 2:  # the finalists' later seeds are marks only
            axis.violinplot([first], positions=[row], orientation="horizontal", showextrema=False)
        axis.scatter(values, [row] * len(values), s=18, zorder=3)
    axis.set_yticks(range(len(arms)), [f"{arm['name']} ({arm['kind']})" for arm in arms], fontsize=8)
    axis.set_xlabel(f"test BLEU ({summary['split']}, sacreBLEU)")
    axis.grid(axis="x", alpha=0.3)
    axis.set_title(f"{summary['name']}: every run, at equal parameters", fontsize=9)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    return image.getvalue()


def write_report(summary: dict, out_dir: Path) -> None:
    """Write ``table.md`` and ``bleu.png`` of ``summary`` into ``out_dir``."""
    write_atomic(out_dir / "table.md", table(summary))
    write_atomic(out_dir / "bleu.png", plot(summary))
