"""Speed and memory of conv variants against the static network, measured side by side.

Cases are timed round-robin (one call of each case per round) so that a slow drift of the machine
(thermal state, other processes) affects every case alike, which is what makes ratios between
cases measured in one run trustworthy. Peak memory is measured in a fresh process per case
(:func:`training_memory`), so one case's allocator state cannot leak into another's.
"""
from __future__ import annotations

import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .malloc import reuse_freed_memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    cases: Mapping[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, float]:
    """Median seconds per call of each case, timing the cases round-robin after ``warmup`` rounds."""
    times = interleaved_times(cases, repeats, warmup, device)
    return {name: statistics.median(values) for name, values in times.items()}


def interleaved_times(
    cases: Mapping[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device = torch.device("cpu"),
) -> Dict[str, List[float]]:
    """Seconds of each of ``repeats`` calls of each case, the cases timed round-robin after ``warmup`` rounds."""
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for round_index in range(warmup + repeats):
        for name, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def machine_summary() -> Dict[str, object]:
    """What the numbers were measured on."""
    import platform

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures: training steps at ``batch`` (forward, backward, SGD step),
    eval throughput at ``eval_batch`` and eval latency at batch 1, all at ``image_size``."""

    batch: int = 16
    eval_batch: int = 32
    image_size: int = 224
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    num_classes: int = 1000
    reuse_freed_memory: bool = True  # CPU: glibc keeps freed memory (dynconv.malloc), as train.py does


def _prepare(settings: BenchSettings) -> torch.device:
    torch.set_flush_denormal(True)  # a random network's tiny activations must not hit slow denormal paths
    device = torch.device(settings.device)
    if settings.reuse_freed_memory:
        reuse_freed_memory(device)
    return device


def _inputs(batch: int, settings: BenchSettings, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, settings.image_size, settings.image_size, generator=gen)
    y = torch.randint(0, settings.num_classes, (batch,), generator=gen)
    return x.to(device), y.to(device)


def training_step(model: nn.Module, settings: BenchSettings) -> Callable[[], None]:
    """One SGD step of ``model`` on a fixed random batch (the task loss plus the layers' auxiliary loss)."""
    from .auxiliary import auxiliary_loss
    from .schedules import set_progress

    device = torch.device(settings.device)
    x, y = _inputs(settings.batch, settings, device)
    # a tiny learning rate: the weights hardly move, so every timed step does the same work
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    set_progress(model, float("inf"))  # timed at the schedules' end values, on purpose

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + auxiliary_loss(model)
        loss.backward()
        optimizer.step()

    return step


def inference(model: nn.Module, batch: int, settings: BenchSettings) -> Callable[[], None]:
    """An eval-mode forward of ``model`` on a fixed random batch."""
    x, _ = _inputs(batch, settings, torch.device(settings.device))

    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    return forward


def compare_convs(arch: str, convs: Sequence[str], settings: BenchSettings = BenchSettings(),
                  memory: bool = True) -> List[Dict[str, object]]:
    """Train-step time, eval throughput, batch-1 latency and peak training memory of each of
    ``convs`` on ``arch``, each also as a ratio to ``static`` (measured in the same run).

    ``static`` is added when missing. Ratios are ``variant / static`` for times and memory.
    """
    from . import count_macs, count_params, create_model

    device = _prepare(settings)
    names = ["static", *[c for c in convs if c != "static"]]
    models = {}
    for conv in names:
        torch.manual_seed(0)
        models[conv] = create_model(arch, conv, num_classes=settings.num_classes).to(device)
    size = settings.image_size
    macs = {c: count_macs(m, (1, 3, size, size)) for c, m in models.items()}
    timed = {}
    for key, make in (("train_step_s", lambda m: training_step(m, settings)),
                      ("eval_batch_s", lambda m: inference(m, settings.eval_batch, settings)),
                      ("latency_s", lambda m: inference(m, 1, settings))):
        timed[key] = interleaved_medians({c: make(m) for c, m in models.items()}, settings.repeats,
                                         settings.warmup, device)
    rows = []
    for conv, model in models.items():
        row: Dict[str, object] = {"arch": arch, "conv": conv, "params_m": round(count_params(model) / 1e6, 3),
                                  "macs_g": round(macs[conv] / 1e9, 4),
                                  "macs_ratio": round(macs[conv] / macs["static"], 3)}
        for key, values in timed.items():
            row[key] = round(values[conv], 5)
            row[key[:-2] + "_ratio"] = round(values[conv] / values["static"], 3)
        row["eval_images_per_s"] = round(settings.eval_batch / timed["eval_batch_s"][conv], 2)
        rows.append(row)
    if memory:
        peaks = {c: training_memory(arch, c, settings) for c in names}
        for row in rows:
            peak = peaks[row["conv"]]
            row["train_memory_mb"] = round(peak / 2**20, 1)
            # None where the static run did not raise the peak at all (tiny settings)
            row["train_memory_ratio"] = round(peak / peaks["static"], 3) if peaks["static"] > 0 else None
    return rows


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_rss_peak() -> int:
    """Reset the process's peak RSS to its current RSS (Linux ``clear_refs`` 5) and return that RSS;
    without it, the peak would still hold the transient of importing the libraries."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:  # not Linux, or not allowed: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_peak_bytes() -> int:
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_training_memory(arch: str, conv: str, settings: BenchSettings, steps: int = 2) -> int:
    """Peak memory of training steps in this process, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` over the steps, model and optimizer state included.
    CPU: the peak RSS over the steps minus the RSS just before the model is built (model, optimizer state, activations, per-sample kernels and the allocator's slack), so
    the interpreter and the imported libraries, the same for every case, do not dilute the ratio.
    Call it in a fresh process (:func:`training_memory` does) so the peak belongs to this case.
    """
    from . import create_model

    device = _prepare(settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        _inputs(settings.batch, settings, device)  # warms the generator; the batch itself is data
        start = _reset_rss_peak()
    torch.manual_seed(0)
    step = training_step(create_model(arch, conv, num_classes=settings.num_classes).to(device), settings)
    for _ in range(steps):
        step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - start
    return _rss_peak_bytes() - start


def training_memory(arch: str, conv: str, settings: BenchSettings) -> int:
    """:func:`measure_training_memory` in a fresh Python process (same thread count)."""
    code = ("import json, sys, torch; from dynconv.benchmark import BenchSettings, measure_training_memory; "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            "a = json.loads(sys.argv[1]); "
            "print(measure_training_memory(a['arch'], a['conv'], BenchSettings(**a['settings'])))")
    args = json.dumps({"arch": arch, "conv": conv, "settings": asdict(settings)})
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory of {arch}/{conv} failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def profile_training_step(arch: str, conv: str, settings: BenchSettings = BenchSettings(), steps: int = 2,
                          rows: int = 15) -> Dict[str, str]:
    """Where a training step's time goes: ``torch.profiler`` over ``steps`` steps after two warm-up ones.

    Returns two text tables, ``"ops"`` (the ``rows`` ops with the most self time) and ``"shapes"`` (the
    same, split by input shapes, which tells the layers apart).
    """
    from torch.profiler import ProfilerActivity, profile

    from . import create_model

    device = _prepare(settings)
    torch.manual_seed(0)
    step = training_step(create_model(arch, conv, num_classes=settings.num_classes).to(device), settings)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {"ops": prof.key_averages().table(sort_by=sort, row_limit=rows),
            "shapes": prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows)}


def _onnx_session(model: nn.Module, x: torch.Tensor, path: str):
    """An onnxruntime session of ``model`` exported with a symbolic batch (``torch.onnx.export(dynamo=True)``,
    the export dynconv supports), on as many threads as torch uses."""
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1, max=64)
    example = x.expand(2, *x.shape[1:]).contiguous()
    torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False).save(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # no spin-waiting: on a shared machine a spinning pool loses its time slices to the other processes
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: x.numpy()}
    return lambda: session.run(None, feed)


@torch.no_grad()
def calibrate_norms(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every BatchNorm of ``model`` the statistics of ``x`` (one train-mode forward, cumulative average),
    as a trained model has: a fresh DCD / DGC model normalises with batch statistics in eval mode
    (``dynconv.models.use_batch_statistics_until_trained``), which costs time a trained model does not spend
    and keeps ``deploy`` from folding them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
    model.train()
    model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def _ratio(value: float) -> float:
    """A ratio kept to four significant digits (a fixed number of decimals would drop most of a small one)."""
    return float(f"{value:.4g}")


@contextlib.contextmanager
def _compiled_side_by_side(models: int) -> Iterator[None]:
    """Room in dynamo's cache for ``models`` compiled models timed round-robin: they share the code object of
    their ``forward`` (timm's), whose cache holds ``recompile_limit`` (8) entries, beyond which dynamo would
    run the frame eagerly without a word (and the 'compiled' time would be eager's). Hitting the limit
    anyway raises, which the table records as that model's error."""
    config = torch._dynamo.config
    saved = config.recompile_limit, config.fail_on_recompile_limit_hit
    config.recompile_limit, config.fail_on_recompile_limit_hit = max(saved[0], 2 * models), True
    try:
        yield
    finally:
        config.recompile_limit, config.fail_on_recompile_limit_hit = saved


def latency_vs_bound(arch: str, convs: Sequence[str], settings: BenchSettings = BenchSettings(),
                     runtimes: Sequence[str] = ("eager", "compile", "onnx"), repeats: int = 30,
                     copy_mb: int = 512, flush_denormal: bool = True) -> List[Dict[str, object]]:
    """Batch-1 latency of each of ``convs`` on ``arch`` against the bound its method imposes
    (:mod:`dynconv.latency_bound`), measured on this machine in this run.

    Every model's BatchNorms hold statistics (:func:`calibrate_norms`), as a trained model's do. Every model is
    timed as :func:`dynconv.deploy` gives it (BatchNorms folded: what a user ships) and, in
    eager mode, also as built. ``static`` is added when missing; its deployed eager time is the bound's static
    time. Runtimes: ``"eager"`` (always, round-robin with static), ``"compile"`` (``torch.compile`` of the
    deployed model) and ``"onnx"`` (onnxruntime on the exported deployed model); a runtime that fails for a
    model records its error instead of a time. Times are the fastest of ``repeats`` round-robin calls: on a
    shared machine the minimum is the time least inflated by other processes (the medians of eager calls are
    kept too). The machine's rates (:func:`dynconv.latency_bound.rate_probes`,
    a ``copy_mb`` MB copy among them) are timed round-robin with the eager cases, under the same load.

    With ``flush_denormal`` (``torch.set_flush_denormal``, reset when done) denormal floats are flushed to
    zero: the random-weight models' saturated attentions (a sigmoid of a large negative logit) give denormal
    factors, which multiply whole kernels and made the arithmetic on them several times slower (ODConv 1x
    MobileNetV2 39 ms instead of 23, ``scripts/profile_batch1_layers.py``), a cost of the random weights that
    the bound does not model and a deployment flushes away.
    """
    if flush_denormal and torch.set_flush_denormal(True):
        try:
            return latency_vs_bound(arch, convs, settings, runtimes, repeats, copy_mb, flush_denormal=False)
        finally:
            torch.set_flush_denormal(False)
    import tempfile

    from . import count_macs, create_model
    from .deploy import deploy
    from .latency_bound import (count_aten_ops, dispatch_probe, latency_bound, method_costs, rate_probes,
                                rates_from_seconds)

    device = _prepare(settings)
    if device.type != "cpu":
        raise ValueError("latency_vs_bound measures CPU latency (its bandwidth and ORT runs are CPU ones)")
    names = ["static", *[c for c in convs if c != "static"]]
    size = settings.image_size
    x, _ = _inputs(1, settings, device)
    calibration, _ = _inputs(2, settings, device)
    models, deployed = {}, {}
    for conv in names:
        torch.manual_seed(0)
        models[conv] = calibrate_norms(create_model(arch, conv, num_classes=settings.num_classes), calibration)
        deployed[conv] = deploy(models[conv], x)
    costs = {c: method_costs(m, (1, 3, size, size)) for c, m in deployed.items()}
    static_macs = count_macs(deployed["static"], (1, 3, size, size))
    aten_ops = {c: count_aten_ops(m, x) for c, m in deployed.items()}

    def forward(model: Callable) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(x)
        return run

    cases = {c: forward(m) for c, m in deployed.items()}
    cases.update({f"{c}/model": forward(m) for c, m in models.items() if c != "static"})
    probes = rate_probes(copy_mb)
    cases.update({f"rate/{name}": fn for name, (fn, _) in probes.items()})
    cases["rate/dispatch"], probe_ops = dispatch_probe()
    eager_times = interleaved_times(cases, repeats, settings.warmup, device)
    eager = {name: min(values) for name, values in eager_times.items()}
    eager_median = {name: statistics.median(values) for name, values in eager_times.items()}
    rates = rates_from_seconds(probes, {name: eager[f"rate/{name}"] for name in probes})
    del probes, cases
    timed: Dict[str, Dict[str, float]] = {}
    errors: Dict[str, Dict[str, str]] = {}
    if "compile" in runtimes or "onnx" in runtimes:
        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as tmp, _compiled_side_by_side(len(deployed)):
            for runtime in [r for r in ("compile", "onnx") if r in runtimes]:
                fns = {}
                for conv, model in deployed.items():
                    try:
                        if runtime == "compile":
                            fn = forward(torch.compile(model))
                        else:
                            fn = _onnx_session(model, x, f"{tmp}/{conv}.onnx")
                        fn()  # compiles / builds the session
                        fns[conv] = fn
                    except Exception as error:  # noqa: BLE001 (recorded in the table instead)
                        errors.setdefault(conv, {})[runtime] = f"{type(error).__name__}: {str(error)[:200]}"
                timed[runtime] = {name: min(values) for name, values in
                                  interleaved_times(fns, repeats, settings.warmup, device).items()}
    rows = []
    static = eager["static"]
    op_seconds = eager["rate/dispatch"] / probe_ops
    for conv in names:
        bound = latency_bound(costs[conv], static, static_macs, rates)
        cost = costs[conv]
        # the dispatch of the ops the method adds, at the probe's cost per op: eager time the bound does not see
        dispatch = max(0, aten_ops[conv] - aten_ops["static"]) * op_seconds
        row: Dict[str, object] = {
            "arch": arch, "conv": conv, "bound_s": round(bound, 6), "bound_ratio": _ratio(bound / static),
            "eager_s": round(eager[conv], 6), "eager_bound_ratio": _ratio(eager[conv] / bound),
            "eager_static_ratio": _ratio(eager[conv] / static),
            "eager_model_s": round(eager.get(f"{conv}/model", eager[conv]), 6),
            "eager_median_s": round(eager_median[conv], 6),
            "static_median_s": round(eager_median["static"], 6),
            "bytes_mb": round(sum(layer.bytes for layer in cost.layers) / 2**20, 2),
            "mixing_macs_m": round(cost.total("mixing_macs") / 1e6, 2),
            "conv_macs_m": round(cost.total("conv_macs") / 1e6, 2),
            "attention_macs_m": round(cost.total("attention_macs") / 1e6, 3),
            "rates": {k: round(v / 1e9, 2) for k, v in rates.__dict__.items()},  # GB/s, GMAC/s
            "aten_ops": aten_ops[conv], "static_aten_ops": aten_ops["static"],
            "op_dispatch_us": round(op_seconds * 1e6, 3), "dispatch_s": round(dispatch, 6),
            "eager_bound_dispatch_ratio": _ratio(eager[conv] / (bound + dispatch)),
        }
        for runtime, key in (("compile", "compiled_s"), ("onnx", "onnxruntime_s")):
            if runtime in timed and conv in timed[runtime]:
                row[key] = round(timed[runtime][conv], 6)
        if conv in errors:
            row["errors"] = errors[conv]
        rows.append(row)
    return rows
