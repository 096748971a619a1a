"""Top-1 of a model converted from a static checkpoint, without any update, at several schedule positions.

    python scripts/probe_converted_schedule.py --conv kw_1x --pretrained runs/.../best.pt \
        --val .cache/synthetic/c10-n200-v50-64px/val --progress 0 0.75 1.5 7.5 15

Shows whether a family's converted layers stay at the static function as its schedule advances (KernelWarehouse:
tau = 1 -> 0 over ``mixing_epochs``), i.e. whether a fine-tune's schedule can start the ramp at all.
The transform is the demo data's evaluation transform (``data=synthetic``: crop_pct 1.0, ImageNet mean/std).
"""
from __future__ import annotations

import argparse

import torch
import torchvision.transforms as T
from torchvision.datasets import ImageFolder

import dynconv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mobilenetv2_100")
    parser.add_argument("--conv", required=True)
    parser.add_argument("--pretrained", required=True, help="static checkpoint of the same arch")
    parser.add_argument("--val", required=True, help="ImageFolder validation directory")
    parser.add_argument("--progress", type=float, nargs="+", default=[0.0, 0.75, 1.5, 3.75, 7.5, 15.0])
    parser.add_argument("--seed", type=int, default=0, help="for the layers that start at their official random init")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = ImageFolder(args.val, transform=T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406),
                                                                                  (0.229, 0.224, 0.225))]))
    model = dynconv.create_model(args.arch, args.conv, num_classes=len(data.classes), pretrained=args.pretrained)
    model.eval()
    loader = torch.utils.data.DataLoader(data, batch_size=100)
    for progress in args.progress:
        dynconv.set_progress(model, progress)
        values = sorted({round(float(m.temperature), 4) for m in model.modules()
                         if isinstance(getattr(m, "temperature", None), torch.Tensor)})
        correct = 0
        with torch.no_grad():
            for images, labels in loader:
                correct += (model(images).argmax(1) == labels).sum().item()
        print(f"progress {progress:g} (epochs): schedule value(s) {values}  top-1 {100 * correct / len(data):.1f}")


if __name__ == "__main__":
    main()
