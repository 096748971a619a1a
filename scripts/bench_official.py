"""The OFFICIAL ODConv and KernelWarehouse models beside dynconv's: peak training memory (live tensor bytes,
``dynconv.memory_floor.live_training_memory``) and training-step time, each as a ratio to dynconv's static
network of the same arch, measured in one process under one allocator setting (glibc keeps freed memory,
``dynconv.malloc.reuse_freed_memory``, as ``train.py`` does). Writes ``results/bench_official_<device>.md`` and
``.json``.

The official model files are imported from checkouts of OSVAI/ODConv and OSVAI/KernelWarehouse (nothing of
them is copied into dynconv): ``models/od_resnet.py`` / ``models/od_mobilenetv2.py`` with ``modules/odconv.py``,
and ``models/kw_resnet.py`` / ``models/kw_mobilenetv2.py`` with ``modules/kernel_warehouse.py``. Get them with

    git clone https://github.com/OSVAI/ODConv /tmp/ODConv
    git clone https://github.com/OSVAI/KernelWarehouse /tmp/KernelWarehouse
    python scripts/bench_official.py --odconv-repo /tmp/ODConv --kw-repo /tmp/KernelWarehouse

(or set ``DYNCONV_ODCONV_REPO`` / ``DYNCONV_KW_REPO``). A bare git directory (a mirror) works too: its files
are exported to a temporary directory. Cases: ResNet18 at batch 16 (ODConv 1x / 4x, KernelWarehouse 1x / 4x)
and MobileNetV2 1.0 at batch 32 (ODConv 1x / 4x, KernelWarehouse 1x), 224 px.

    python scripts/bench_official.py [--repeats 5] [--archs resnet18,mobilenetv2_100] [--no-time]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dynconv  # noqa: E402
from dynconv.benchmark import BenchSettings, _prepare, interleaved_medians, machine_summary, training_step  # noqa: E402
from dynconv.memory_floor import live_training_memory  # noqa: E402

RESULTS = ROOT / "results"
ODCONV_FILES = ("models/od_resnet.py", "models/od_mobilenetv2.py", "modules/odconv.py")
KW_FILES = ("models/kw_resnet.py", "models/kw_mobilenetv2.py", "modules/kernel_warehouse.py")
BATCH = {"resnet18": 16, "mobilenetv2_100": 32}
# (dynconv conv, official repo, official file, official function, keyword arguments of the official
# training command: ODConv main.py --kernel_num; KernelWarehouse configs/<arch>/kw*.json)
CASES: Dict[str, List[Tuple[str, str, str, str, Dict[str, object]]]] = {
    "resnet18": [
        ("odconv_1x", "odconv", "models/od_resnet.py", "od_resnet18", {"kernel_num": 1}),
        ("odconv_4x", "odconv", "models/od_resnet.py", "od_resnet18", {"kernel_num": 4}),
        ("kw_1x", "kw", "models/kw_resnet.py", "kw_resnet18", {"cell_num_ratio": 1, "sharing_range": ("layer", "conv")}),
        ("kw_4x", "kw", "models/kw_resnet.py", "kw_resnet18", {"cell_num_ratio": 4, "sharing_range": ("layer", "conv")}),
    ],
    "mobilenetv2_100": [
        ("odconv_1x", "odconv", "models/od_mobilenetv2.py", "od_mobilenetv2_100", {"kernel_num": 1}),
        ("odconv_4x", "odconv", "models/od_mobilenetv2.py", "od_mobilenetv2_100", {"kernel_num": 4}),
        ("kw_1x", "kw", "models/kw_mobilenetv2.py", "kw_mobilenetv2_100",
         {"cell_num_ratio": 1, "sharing_range": ("layer", "pwconv")}),
    ],
}
# the temperatures at the end of the official schedules (ODConv utils/misc.py get_temperature: 30 -> 1;
# KernelWarehouse main.py --temp_init_value 1 -> 0), where dynconv's training step holds its layers too
END_TEMPERATURE = {"odconv": 1.0, "kw": 0.0}


def _checkout(given: Optional[str], env: str, name: str, files: Tuple[str, ...], mirror: str,
              tmp: Path) -> Path:
    """A directory with the official files: the checkout given (or in ``env``), else the fetched mirror.
    Exits with how to get the code when neither has it."""
    candidates = [Path(p) for p in (given, os.environ.get(env)) if p] or [Path(mirror)]
    for path in candidates:
        if all((path / f).is_file() for f in files):
            return path
        if (path / "HEAD").is_file() or (path / "repo" / "HEAD").is_file():  # a bare git dir: export its files
            git_dir = path if (path / "HEAD").is_file() else path / "repo"
            out = tmp / name
            out.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", "HEAD", "models", "modules"],
                                     capture_output=True, check=False)
            if archive.returncode == 0:
                subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
                if all((out / f).is_file() for f in files):
                    return out
    repo = {"odconv": "OSVAI/ODConv", "kw": "OSVAI/KernelWarehouse"}[name]
    flag = {"odconv": "--odconv-repo", "kw": "--kw-repo"}[name]
    sys.exit(f"error: the official {repo} code is not found (looked in {', '.join(map(str, candidates))}; "
             f"needs {', '.join(files)}).\nGet it with: git clone https://github.com/{repo} /tmp/{repo.split('/')[1]}\n"
             f"and pass {flag} /tmp/{repo.split('/')[1]} (or set {env}).")


@contextlib.contextmanager
def _official_imports(path: Path) -> Iterator[None]:
    """Import from ``path`` (its ``modules`` package) with timm's ``register_model`` inert, so the official
    files cannot overwrite timm's own ``resnet18`` / ``mobilenetv2_100`` entries; afterwards the two
    repositories' ``models`` / ``modules`` packages, which share names, leave ``sys.modules``."""
    import timm.models
    import timm.models.registry as registry

    saved = registry.register_model, timm.models.register_model
    registry.register_model = timm.models.register_model = lambda fn: fn
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        registry.register_model, timm.models.register_model = saved
        for name in [n for n in sys.modules if n.split(".")[0] in ("models", "modules")]:
            del sys.modules[name]


def official_builder(path: Path, file: str, function: str) -> Callable[..., nn.Module]:
    """The model function ``function`` of ``path/file``, imported without the package's ``__init__``."""
    with _official_imports(path):
        spec = importlib.util.spec_from_file_location(f"_official_{Path(file).stem}", path / file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return getattr(module, function)


def build_cases(arch: str, repos: Dict[str, Path], num_classes: int) -> Dict[str, nn.Module]:
    """Ours (static and each conv) and the official models of ``arch``, all on CPU, seeded alike."""
    models: Dict[str, nn.Module] = {}
    torch.manual_seed(0)
    models["static (dynconv)"] = dynconv.create_model(arch, "static", num_classes=num_classes)
    for conv, repo, file, function, kwargs in CASES[arch]:
        torch.manual_seed(0)
        models[f"{conv} (dynconv)"] = dynconv.create_model(arch, conv, num_classes=num_classes)
        torch.manual_seed(0)
        official = official_builder(repos[repo], file, function)(num_classes=num_classes, **kwargs)
        official.net_update_temperature(END_TEMPERATURE[repo])
        models[f"{conv} (official {function})"] = official
    return models


def measure(arch: str, repos: Dict[str, Path], settings: BenchSettings, time_it: bool) -> List[Dict[str, object]]:
    device = _prepare(settings)
    models = build_cases(arch, repos, settings.num_classes)
    peaks = {name: live_training_memory(m, settings) for name, m in models.items()}
    times = (interleaved_medians({n: training_step(m.to(device), settings) for n, m in models.items()},
                                 settings.repeats, settings.warmup, device) if time_it else {})
    static = "static (dynconv)"
    rows = []
    for name, model in models.items():
        row: Dict[str, object] = {"arch": arch, "model": name, "batch": settings.batch,
                                  "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                                  "peak_mib": round(peaks[name] / 2**20, 1),
                                  "memory_ratio": round(peaks[name] / peaks[static], 3)}
        if times:
            row["train_step_s"] = round(times[name], 4)
            row["train_ratio"] = round(times[name] / times[static], 3)
        rows.append(row)
    return rows


def markdown(command: str, machine: Dict, rows: List[Dict[str, object]], settings: BenchSettings) -> str:
    timed = any("train_step_s" in r for r in rows)
    lines = [f"# Official ODConv / KernelWarehouse code beside dynconv: {settings.device}", "", f"`{command}`", "",
             f"Machine: {machine}. Memory: peak live tensor bytes over two training steps (forward, backward, "
             "SGD step with momentum: parameters, gradients, optimizer state, saved activations and temporaries, "
             "each storage once; what `torch.cuda.max_memory_allocated` counts on a GPU), deterministic. "
             f"Time: median training step over {settings.repeats} rounds after {settings.warmup} warm-up rounds, "
             "all models of one arch timed round-robin in one process, glibc keeping freed memory "
             "(`dynconv.malloc.reuse_freed_memory`) for every model alike. Ratios are to dynconv's static network "
             "of the same arch in the same run. The official models at the end of their temperature schedules "
             "(ODConv T = 1, KernelWarehouse tau = 0), as dynconv's are.", "",
             "| arch | batch | model | params (M) | peak memory (MiB) | memory ratio |"
             + (" train step (s) | train ratio |" if timed else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if timed else "")]
    for r in rows:
        line = (f"| {r['arch']} | {r['batch']} | {r['model']} | {r['params_m']:.2f} | {r['peak_mib']:.1f} "
                f"| {r['memory_ratio']:.2f} |")
        if timed:
            line += (f" {r['train_step_s']:.3f} | {r['train_ratio']:.2f} |" if "train_step_s" in r else " | |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--odconv-repo", help="checkout (or bare git dir) of OSVAI/ODConv; env DYNCONV_ODCONV_REPO")
    parser.add_argument("--kw-repo", help="checkout (or bare git dir) of OSVAI/KernelWarehouse; env DYNCONV_KW_REPO")
    parser.add_argument("--archs", default="resnet18,mobilenetv2_100")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-time", action="store_true", help="memory only")
    parser.add_argument("--out", default=None, help="output stem (default results/bench_official_<device>)")
    args = parser.parse_args(argv)
    mirrors = Path("/work/.mirror")
    with tempfile.TemporaryDirectory() as tmp:
        repos = {"odconv": _checkout(args.odconv_repo, "DYNCONV_ODCONV_REPO", "odconv", ODCONV_FILES,
                                     str(mirrors / "OSVAI+ODConv"), Path(tmp)),
                 "kw": _checkout(args.kw_repo, "DYNCONV_KW_REPO", "kw", KW_FILES,
                                 str(mirrors / "OSVAI+KernelWarehouse"), Path(tmp))}
        rows: List[Dict[str, object]] = []
        for arch in args.archs.split(","):
            settings = BenchSettings(batch=BATCH[arch], repeats=args.repeats, warmup=args.warmup, device=args.device)
            rows += measure(arch, repos, settings, not args.no_time)
            print(json.dumps(rows[-1]), flush=True)
    stem = Path(args.out) if args.out else RESULTS / f"bench_official_{args.device}"
    command = "python scripts/bench_official.py " + " ".join(argv if argv is not None else sys.argv[1:])
    measured = {r["arch"] for r in rows}
    if stem.with_suffix(".json").is_file():  # a run of some archs keeps the other archs' rows
        kept = json.loads(stem.with_suffix(".json").read_text()).get("rows", [])
        rows = [r for r in kept if r["arch"] not in measured] + rows
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine_summary(), "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(command.strip(), machine_summary(), rows, settings))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
