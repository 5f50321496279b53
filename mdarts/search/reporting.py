"""What a search reports while it runs: each node's argmax op, how stable it is, DARTS
collapse, a one-line genotype for the progress bar, and the alpha heatmap
(docs/design.md 1.1)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..config import ModelConfig
from ..files import write_atomic
from ..genotype import Genotype
from ..ops import parameter_free_ops


def argmax_ops(weights: dict[str, list[list[list[float]]]], config: ModelConfig) -> list[str]:
    """The argmax op (zero included) of every node, encoder nodes then decoder nodes."""
    ops = []
    for side in ("encoder", "decoder"):
        candidates = getattr(config, f"{side}_candidates")
        ops.extend(candidates[max(range(len(node)), key=node.__getitem__)] for layer in weights[side] for node in layer)
    return ops


def argmax_stability(previous: Optional[Sequence[str]], current: Sequence[str]) -> Optional[float]:
    """Fraction of nodes whose argmax op is unchanged since ``previous`` (None without one)."""
    if previous is None or len(previous) != len(current):
        return None
    return sum(a == b for a, b in zip(previous, current)) / len(current)


def collapse_message(ops: Sequence[str]) -> Optional[str]:
    """A warning when zero or identity is the argmax of more than half of the nodes, else None."""
    free = parameter_free_ops()
    taken = sum(op in free for op in ops)
    if 2 * taken <= len(ops):
        return None
    return (
        f"DARTS collapse: zero or identity is the argmax of {taken} of {len(ops)} nodes; "
        "consider a shorter search, a lower alpha_lr or a larger alpha_weight_decay"
    )


def short_summary(genotype: Genotype) -> str:
    """One-line genotype for a progress bar, e.g. ``E attention,ffn|conv3,glu D ffn,conv5|...``."""
    return " ".join(
        f"{side[0].upper()} " + "|".join(",".join(layer) for layer in getattr(genotype, side))
        for side in ("encoder", "decoder")
    )


def plot_alpha_history(history: Sequence[dict], config: ModelConfig, path: Path) -> None:
    """Heatmaps of each node's weights over the search, one panel per node (rows: side and unit
    layer, columns: split), candidates on the y axis, evaluation steps on the x axis. A cell is
    the weight against uniform, log2(K * softmax(alpha)_o) for a node of K candidates, on one
    diverging scale centred on 0 (uniform), so nodes of 13 and 14 candidates compare; candidates
    removed by progressive shrinking (weight 0) are grey. PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in history]
    rows = [(side, i) for side in ("encoder", "decoder") for i in range(config.unit_layers)]
    columns = max(config.encoder_splits, config.decoder_splits - 1)
    height = max(len(config.encoder_candidates), len(config.decoder_candidates)) * 0.22 + 1.0
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns + 1.5, height * len(rows)), squeeze=False)
    with np.errstate(divide="ignore"):  # a removed candidate: log2(0), masked
        ratios = {
            (side, i, k): np.ma.masked_invalid(
                np.log2(len(node) * np.array([r[side][i][k] for r in history]).T), copy=False
            )
            for side, i in rows
            for k, node in enumerate(history[0][side][i])
        }  # (candidates, evaluations) each
    limit = max(1.0, max(float(np.abs(values).max()) for values in ratios.values()))
    colours = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.8")
    mappable = None
    for r, (side, i) in enumerate(rows):
        candidates = getattr(config, f"{side}_candidates")
        for k in range(columns):
            ax = axes[r][k]
            if (side, i, k) not in ratios:
                ax.axis("off")
                continue
            values = ratios[side, i, k]
            mappable = ax.imshow(values, aspect="auto", interpolation="nearest", cmap=colours, vmin=-limit, vmax=limit)
            ax.set_yticks(range(len(candidates)), candidates, fontsize=7)
            ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 5))})
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
            best = int(values[:, -1].argmax())
            ax.set_title(f"{side}[{i}][{k}] -> {candidates[best]} ({2 ** values[best, -1]:.1f}x uniform)", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("step", fontsize=7)
    fig.suptitle("each node's weights against uniform (red: above 1/K, blue: below, grey: removed)")
    fig.tight_layout(rect=(0, 0, 0.86, 0.96))
    if mappable is not None:
        bar = fig.colorbar(mappable, cax=fig.add_axes((0.88, 0.1, 0.015, 0.8)))
        bar.set_label("weight / uniform (log2: 1 = twice uniform)")
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, image.getvalue())
