"""The figure of the sampling evaluation: ``accuracy_vs_epoch.png`` from its metrics (headless matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_accuracy"]


def plot_accuracy(metrics: Mapping[str, Any], path: str | Path) -> bool:
    """Test accuracy (mean ± std) vs fine-tuning epoch per group; transfer in a second panel."""
    from matplotlib.figure import Figure  # no pyplot: headless
    from matplotlib.ticker import MaxNLocator

    from sane_hf.verdicts import degenerate_groups, group_name

    accuracy = metrics.get("accuracy") or {}
    degenerate = set(degenerate_groups(metrics))
    if not accuracy:
        return False
    transfer = metrics.get("transfer")
    panels = 2 if transfer else 1
    fig = Figure(figsize=(5.5 * panels, 4.2), dpi=110)
    axes = fig.subplots(1, panels, squeeze=False)[0]

    def draw(ax, curves: Mapping[str, Any], title: str) -> None:
        for name, curve in curves.items():
            xs = sorted(int(e) for e in curve)
            mean = [curve[str(e)]["mean"] for e in xs]
            std = [curve[str(e)]["std"] for e in xs]
            label = group_name(name) + (" (degenerate)" if name in degenerate else "")
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, label=label,
                        ls=":" if name in degenerate else "-")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("fine-tuning epochs")
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")

    draw(axes[0], accuracy, f"SANE samples vs baselines: {metrics.get('arch')} on {metrics.get('task')}")
    if transfer:
        fallback = " (fallback: permuted labels)" if transfer.get("fallback") else ""
        draw(axes[1], transfer["accuracy"], f"transfer to {transfer['task']}{fallback}: samples vs random init")
    fig.tight_layout()
    fig.savefig(path)
    return True
