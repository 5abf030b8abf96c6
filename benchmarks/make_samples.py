"""Derive the small data samples shipped in `kdpo_lora/data/samples/` from the full normalised files.

Usage: python benchmarks/make_samples.py ../shared/data
Each sample takes the first N records of a file after a seeded shuffle (seed 0), keeping their lines
byte-for-byte; the shipped README records sources and licences.
"""

import random
import sys
from pathlib import Path

SIZES = {
    "counterfact.jsonl": 120,
    "counterfact_portability.jsonl": 100,
    "zsre_portability.jsonl": 100,
    "knowedit_zsre.jsonl": 50,
    "knowedit_wiki_counterfact_test.jsonl": 30,
    "knowedit_wiki_counterfact_train.jsonl": 30,
    "knowedit_wiki_recent_train.jsonl": 30,
    "knowedit_wikibio_test.jsonl": 20,
}
OUT = Path(__file__).resolve().parent.parent / "kdpo_lora" / "data" / "samples"


def main(source: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, size in SIZES.items():
        lines = [line for line in (source / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        random.Random(0).shuffle(lines)
        (OUT / name).write_text("\n".join(lines[:size]) + "\n", encoding="utf-8")
        print(f"{name}: {min(size, len(lines))} of {len(lines)} records")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
