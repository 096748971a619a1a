"""EDO dilation search (IC-Conv, CVPR 2021) end to end on the generated shapes set, on a CPU.

Trains the dense supernet briefly, picks a dilation per output channel, writes the pattern file in the
official format, builds the IC network from it and checks a forward pass.

    python scripts/edo_search.py                              # ResNet18 at 1/4 width, k9, 150 steps (~30 s)
    python scripts/edo_search.py --arch resnet50 --width-divisor 1 --grid k13 --steps 2000 --out r50_k13.json
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch

from dynconv import edo
from dynconv.data import synthetic_datasets
from dynconv.ops.icconv import load_patterns


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18", help="timm model name")
    parser.add_argument("--width-divisor", type=int, default=4, help="ResNets: divide every stage width by this")
    parser.add_argument("--grid", default="k9", choices=["k9", "k13"])
    parser.add_argument("--steps", type=int, default=150, help="supernet training steps")
    parser.add_argument("--init", default="kaiming", choices=["centre", "kaiming"],
                        help="supernet kernels: kaiming over the whole grid (a dense net trained from scratch, "
                             "as the paper's supernet) or the model's kernels at the centre (to start from a "
                             "trained model; a short search from a fresh one then keeps (1, 1))")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64,
                        help="the deepest ResNet stage sees image-size / 32 pixels; taps beyond it see padding")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "dynconv-synthetic-edo"),
                        help="synthetic dataset directory (generated once)")
    parser.add_argument("--out", default="edo_patterns.json", help="pattern file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train, _ = synthetic_datasets(args.data, image_size=args.image_size, train_per_class=200, val_per_class=20)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    model = make_model(args.arch, args.width_divisor, len(train.classes))
    names = edo.build_supernet(model, args.grid, init=args.init)
    print(f"supernet: {len(names)} layers of {args.arch} -> dense {model.get_submodule(names[0]).kernel_size} kernels")
    losses = edo.train_supernet(model, loader, args.steps, lr=args.lr)
    if losses:
        print(f"trained {len(losses)} steps: loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    result = edo.select_dilations(model, args.grid)
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
    print("channels per dilation: " + ", ".join(f"{d}: {n} ({100 * n / total:.0f}%)" for d, n in histogram.items()))
    print(f"wrote {path}; IC model with {len(replaced)} InceptionConv2d layers runs a forward pass")


if __name__ == "__main__":
    main()
