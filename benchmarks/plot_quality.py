"""Plot edit success, generalisation and locality against the number of edits applied, per method.

    python benchmarks/plot_quality.py benchmarks/results/q_*.json -o benchmarks/quality_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("edit_success", "edit success"), ("rephrase_acc", "generalisation (rephrase)"), ("locality", "locality"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results", nargs="+")
    p.add_argument("-o", "--out", default="benchmarks/quality_curves.png")
    args = p.parse_args()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 5.6))
    colours = plt.cm.tab20.colors
    for i, path in enumerate(args.results):
        data = json.loads(Path(path).read_text())
        config = yaml.safe_load(Path(data["config"]).read_text()) if data.get("config") else {}
        settings = {**config, **data.get("settings", {})}
        null_space = settings.get("null_space", 0) > 0
        routed = settings.get("routing") == "subject"
        label = (f"{Path(path).stem} ({data['method']}, batch {data['batch']}, {Path(data['data']).stem}"
                 f"{', null space' if null_space else ''}{', routed' if routed else ''})")
        xs = [point["edits"] for point in data["curve"]]
        for ax, (key, _) in zip(axes, PANELS):
            ax.plot(xs, [point.get(key, float("nan")) for point in data["curve"]], marker="o", label=label,
                    color=colours[i % len(colours)], linestyle=":" if routed else "-" if null_space else "--")
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("edits applied")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle("Sequential editing, SmolLM2-135M NF4 (CPU): all requests edited so far, scored at each point")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(args.out, dpi=110, bbox_inches="tight")  # long labels must not be cut off
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
