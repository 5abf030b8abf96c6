"""Print a Markdown table of benchmark result files (the numbers pasted into RESULTS.md).

    python benchmarks/table.py benchmarks/results/sweep_*.json --keys edit_success gen_efficacy locality
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_KEYS = ["edit_success", "gen_efficacy", "rephrase_acc", "gen_paraphrase", "locality", "efficacy_score",
                "paraphrase_score", "neighborhood_score", "median_seconds_per_edit", "edits"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("--keys", nargs="+", default=DEFAULT_KEYS)
    args = p.parse_args()
    print("| run | " + " | ".join(args.keys) + " |")
    print("|---|" + "---:|" * len(args.keys))
    for path in args.files:
        data = json.loads(Path(path).read_text())
        summary = data.get("summary") or data.get("final", {})  # single-edit runs / sequential runs
        cells = [f"{summary[k]:.3f}" if isinstance(summary.get(k), float) else str(summary.get(k, "-"))
                 for k in args.keys]
        print(f"| {Path(path).stem} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
