"""EDO dilation search (IC-Conv, CVPR 2021) end to end.

Pre-trains the dense supernet, collects its input statistics over a sample of the training data,
picks a dilation per output channel (by default the paper's expected-output criterion, Liu et al. 2021,
Section 3.2), writes the pattern file in the official format, builds the IC network from it and checks
a forward pass.

    # The search as in the paper: ResNet50, k9 grid, supernet trained from scratch on ImageNet for the
    # full 100-epoch schedule (lr 0.1 x batch / 256, x0.1 at epochs 30/60/90), then the selection.
    python scripts/edo_search.py --data-root /data/imagenet --device cuda --out r50_k9.json
    # A short demo on the generated shapes set: ResNet18 at 1/4 width, 150 steps (~30 s on a CPU).
    python scripts/edo_search.py --demo
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import timm
import torch

from dynconv import edo
from dynconv.patterns import load_patterns

# What an unset option means. The paper's search: ImageNet at 224 px, ResNet50, supernet pre-trained for
# the full schedule (dynconv.edo.SUPERNET_EPOCHS and the learning rate at batch 256 scaled linearly).
PAPER: Dict[str, Any] = dict(arch="resnet50", width_divisor=1, epochs=edo.SUPERNET_EPOCHS, steps=None,
                             batch_size=256, lr=None, image_size=224, workers=8)
# --demo: the generated shapes set, a narrow ResNet18 and a few steps, to see the pipeline run.
DEMO: Dict[str, Any] = dict(arch="resnet18", width_divisor=4, epochs=None, steps=150, batch_size=32, lr=0.05,
                            image_size=64, workers=0)


def make_model(arch: str, width_divisor: int, num_classes: int) -> torch.nn.Module:
    kwargs = {}
    if arch.startswith("resnet"):
        # timm zero-initialises each block's last BN, which would starve the supernet's block convs of
        # gradient in a short search (dynconv.create_model turns it off too).
        kwargs["zero_init_last"] = False
        if width_divisor > 1:
            kwargs.update(channels=tuple(c // width_divisor for c in (64, 128, 256, 512)),
                          stem_width=64 // width_divisor)
    if arch.startswith("convnext"):
        kwargs["conv_mlp"] = True
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options with the unset ones filled from :data:`PAPER` or, with ``--demo``, :data:`DEMO`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true",
                        help="short run on the generated shapes set (defaults from DEMO) instead of the paper's search")
    parser.add_argument("--data-root", default=None,
                        help="ImageNet folder holding train/ and val/ (required without --demo)")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "dynconv-synthetic-edo"),
                        help="--demo: generated dataset directory (generated once)")
    parser.add_argument("--arch", default=None, help="timm model name (resnet50; demo resnet18)")
    parser.add_argument("--width-divisor", type=int, default=None,
                        help="ResNets: divide every stage width by this (1; demo 4)")
    parser.add_argument("--grid", default="k9", choices=["k9", "k13"])
    parser.add_argument("--epochs", type=float, default=None,
                        help=f"supernet pre-training epochs ({PAPER['epochs']:g}; ignored when --steps is given)")
    parser.add_argument("--steps", type=int, default=None, help="supernet pre-training steps instead of epochs "
                                                                "(demo 150)")
    parser.add_argument("--init", default="kaiming", choices=["centre", "kaiming"],
                        help="supernet kernels: kaiming over the whole grid (a dense net trained from scratch, "
                             "as the paper's supernet) or the model's kernels at the centre (to start from a "
                             "trained model; a short search from a fresh one then keeps (1, 1))")
    parser.add_argument("--criterion", default="expected_output", choices=list(edo.CRITERIA),
                        help="expected_output: the paper's L1 error between expected outputs (uses the input "
                             "statistics); weight: off-pattern L1 weight mass (no data)")
    parser.add_argument("--statistics-batches", type=int, default=64,
                        help="training batches averaged for the input statistics (0: the whole loader)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"supernet learning rate ({edo.SUPERNET_LR:g} x batch / 256; demo 0.05)")
    parser.add_argument("--batch-size", type=int, default=None, help="(256; demo 32)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training crop (224; demo 64: the deepest ResNet stage then sees 2x2 pixels, and "
                             "taps beyond them see padding)")
    parser.add_argument("--workers", type=int, default=None, help="data loading processes (8; demo 0)")
    parser.add_argument("--device", default=None, help="cuda when available, else cpu")
    parser.add_argument("--out", default="edo_patterns.json", help="pattern file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if not args.demo and args.data_root is None:
        parser.error("the search pre-trains the supernet on ImageNet: pass --data-root, or --demo for a short run "
                     "on generated data")
    given_epochs = args.epochs is not None
    for key, value in (DEMO if args.demo else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if given_epochs and args.steps == (DEMO if args.demo else PAPER)["steps"]:
        args.steps = None  # an explicit --epochs replaces the profile's step count
    if args.lr is None:
        args.lr = edo.SUPERNET_LR * args.batch_size / 256
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.demo:
        from dynconv.data import synthetic_datasets

        train, _ = synthetic_datasets(args.data, image_size=args.image_size, train_per_class=200, val_per_class=20)
    else:
        from dynconv.data import build_transform, imagenet_datasets

        train, _ = imagenet_datasets(args.data_root, train_transform=build_transform(train=True,
                                                                                      image_size=args.image_size))
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=args.device.startswith("cuda"),
                                         persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))
    model = make_model(args.arch, args.width_divisor, len(train.classes))
    names = edo.build_supernet(model, args.grid, init=args.init)
    print(f"supernet: {len(names)} layers of {args.arch} -> dense {model.get_submodule(names[0]).kernel_size} kernels")
    losses = edo.train_supernet(model, loader, args.epochs if args.epochs is not None else 0.0, steps=args.steps,
                                lr=args.lr, device=args.device)
    print(f"trained {len(losses)} steps (lr {args.lr:g}): loss {losses[0]:.3f} -> "
          f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    if args.criterion == "expected_output":
        seen = edo.collect_input_means(model, loader, args.statistics_batches or None, args.device)
        print(f"input statistics over {seen} training images")
    result = edo.select_dilations(model, args.grid, args.criterion)
    path = result.save(args.out)

    ic_model = make_model(args.arch, args.width_divisor, len(train.classes))
    replaced = edo.build_icconv(ic_model, load_patterns(path))
    ic_model.eval()
    with torch.no_grad():
        logits = ic_model(torch.stack([train[i][0] for i in range(4)]))
    assert logits.shape == (4, len(train.classes)) and torch.isfinite(logits).all()

    for layer in result.layers:
        members = " ".join(f"{d[0]}x{d[1]}:{n}" for d, n in layer.pattern.items())
        print(f"  {layer.name:<28} err {layer.relative_error.mean():.3f}  {members}")
    histogram = {d: n for d, n in result.histogram().items() if n}
    total = sum(histogram.values())
    print(f"channels per dilation ({args.criterion}): "
          + ", ".join(f"{d}: {n} ({100 * n / total:.0f}%)" for d, n in histogram.items()))
    print(f"wrote {path}; IC model with {len(replaced)} InceptionConv2d layers runs a forward pass")


if __name__ == "__main__":
    main()
