"""Where the time of one training step goes, for dynamic convolutions against static: ``torch.profiler``
tables of each case (ops by self time, and the same by input shapes), written to
``results/profile_<device>_<arch>.md`` with the command in its header.

    python scripts/profile_step.py --arch resnet18 --convs static odconv_4x kw_1x
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from dynconv.benchmark import BenchSettings, machine_summary, profile_training_step

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--convs", nargs="+", default=["static", "odconv_4x", "dyconv_4x", "kw_1x"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=2, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = BenchSettings(batch=args.batch, image_size=args.image_size, device=args.device)
    command = "python scripts/profile_step.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [f"# Training step profiles: {args.arch}, {args.device}", "", f"`{command}`", "",
             f"Machine: {machine_summary()}. {args.steps} steps at batch {args.batch}, {args.image_size} px "
             "(forward, backward, SGD step), after 2 warm-up steps.", ""]
    for conv in args.convs:
        tables = profile_training_step(args.arch, conv, settings, args.steps, args.rows)
        lines += [f"## {conv}", "", "```", tables["ops"].rstrip(), "```", "", "By input shapes:", "", "```",
                  tables["shapes"].rstrip(), "```", ""]
        print(f"{conv}: profiled", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{torch.device(args.device).type}_{args.arch}.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
