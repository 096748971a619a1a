"""Write the results tables: the papers' numbers beside ours, one markdown file and one figure per table group.

    python scripts/make_tables.py [--runs runs multirun] [--out results] [--tables odconv_resnet18 ...]

Params and MACs are computed for every paper row; accuracies come from finished run directories
(``summary.json``) that match the row (its experiment's table and recipe name: ``dynconv.results``),
"not run" otherwise; COCO tables give box and mask AP. Values on which the sources disagree are
shown with both sources. Each ``<table>.md`` links its ``<table>.png``: top-1 (box AP) against
parameters and against MACs, the papers' points and ours. Runs on the generated data get
``synthetic_runs.md``.
Unreadable run directories are listed on stderr and in the tables, and make the exit status 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynconv.results import detection_counter, dynconv_counter, gather_runs, read_paper, write_tables

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", type=Path, default=[ROOT / "runs", ROOT / "multirun"])
    parser.add_argument("--paper", type=Path, default=ROOT / "results" / "paper.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--tables", nargs="*", help="table groups of paper.csv (default: all)")
    parser.add_argument("--no-detection", action="store_true",
                        help="skip the COCO tables (building every detector to count it takes a few minutes)")
    parser.add_argument("--no-figures", action="store_true", help="markdown tables only (no matplotlib)")
    args = parser.parse_args()
    gathered = gather_runs(p for p in args.runs if p.exists())
    written = write_tables(read_paper(args.paper), gathered, args.out, dynconv_counter(), args.tables,
                           None if args.no_detection else detection_counter(), figures=not args.no_figures)
    print(f"{len(gathered.runs)} runs; wrote " + ", ".join(str(p) for p in written.values()))
    for problem in gathered.problems:
        print(f"could not read {problem}", file=sys.stderr)
    return 1 if gathered.problems else 0


if __name__ == "__main__":
    sys.exit(main())
