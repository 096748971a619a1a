"""The batch-1 latency bound (dynconv.latency_bound): byte and MAC counts against hand counts of small models,
and the bound's arithmetic against hand sums. No timings are asserted."""
import pytest
import torch
from torch import nn

import dynconv
from dynconv.latency_bound import LayerCost, MachineRates, MethodCost, latency_bound, method_costs
from dynconv.ops.condconv import CondConv2d
from dynconv.ops.kernelwarehouse import KWConv2d
from dynconv.ops.odconv import ODConv2d

F32 = 4  # bytes per float32

RATES = MachineRates(bandwidth=10e9, matmul_macs_per_s=100e9, small_macs_per_s=2e9)


def test_one_odconv_layer_moves_its_bank_and_twice_its_kernel():
    """ODConv 4x, 8 -> 16 channels, 3x3, on a 10x10 map: the bank (4 kernels) read once, the mixed kernel
    written and read once, the input read once by the attention's pool; the mixing is one (1 x 4) @ (4 x K)
    product; the attention is fc 8 -> 16 (hidden max(int(8 / 16), 16)) and the four heads 16 -> 8, 16, 9, 4."""
    torch.manual_seed(0)
    model = nn.Sequential(ODConv2d(8, 16, 3, padding=1, bias=False, kernel_num=4)).eval()
    cost = method_costs(model, (1, 8, 10, 10))
    (layer,) = cost.layers
    kernel = 16 * 8 * 3 * 3
    assert layer.bank_bytes == 4 * kernel * F32
    assert layer.kernel_bytes == kernel * F32
    assert layer.map_bytes == 8 * 10 * 10 * F32
    assert layer.bytes == (4 * kernel + 2 * kernel + 8 * 10 * 10) * F32
    assert layer.mixing_macs == 4 * kernel
    assert layer.attention_macs == 8 * 16 + 16 * (8 + 16 + 9 + 4)
    assert layer.conv_macs == 0  # the per-sample conv does the static conv's MACs


def test_condconv_bank_includes_its_expert_biases():
    torch.manual_seed(0)
    model = nn.Sequential(CondConv2d(6, 4, 3, padding=1, num_experts=8)).eval()
    (layer,) = method_costs(model, (1, 6, 5, 5)).layers
    kernel = 4 * 6 * 9
    assert layer.bank_bytes == (8 * kernel + 8 * 4) * F32
    assert layer.kernel_bytes == kernel * F32
    assert layer.mixing_macs == 8 * kernel + 8 * 4  # kernels and biases mixed
    assert layer.attention_macs == 6 * 8  # routing Linear(6 -> 8)


def test_kernelwarehouse_layer_reads_its_whole_warehouse():
    """A private-warehouse KW layer 16 -> 16, 3x3, cell_num_ratio 2: the kernel is cut into m = 9 cells of
    16 x 16, the warehouse holds n = 18; the attention weighs all n for each of the m mixtures."""
    torch.manual_seed(0)
    layer_module = KWConv2d(16, 16, 3, padding=1, bias=False, cell_num_ratio=2)
    model = nn.Sequential(layer_module).eval()
    (layer,) = method_costs(model, (1, 16, 6, 6)).layers
    cell = 16 * 16
    assert layer_module.num_mixtures == 9 and layer_module.attention.num_cells == 18
    assert layer.bank_bytes == 18 * cell * F32
    assert layer.kernel_bytes == 9 * cell * F32
    assert layer.mixing_macs == 9 * 18 * cell
    assert layer.conv_macs == 0


def test_dcd_counts_its_low_rank_path_as_convolution_macs():
    """DCD 16 -> 16, 3x3, stride 1, latent L = 4 on an 8x8 map: Q (16 -> 4) and P (4 -> 16) 1x1 convs and
    Phi (4 x 4) on every pixel are MACs beyond the static conv."""
    from dynconv.ops.dcd import DCDConv2d

    torch.manual_seed(0)
    model = nn.Sequential(DCDConv2d(16, 16, 3, padding=1, bias=False, latent_dim=4)).eval()
    (layer,) = method_costs(model, (1, 16, 8, 8)).layers
    pixels = 8 * 8
    assert layer.conv_macs == (16 * 4 + 4 * 16 + 4 * 4) * pixels
    assert layer.map_bytes == 16 * pixels * F32
    assert layer.kernel_bytes == min(16 * 16 * 9, 16 * pixels) * F32  # Lambda: on the kernel or the output


def test_static_network_bound_is_its_own_time():
    model = dynconv.create_model("resnet18", "static", num_classes=10).eval()
    cost = method_costs(model, (1, 3, 32, 32))
    assert cost.layers == []
    assert latency_bound(cost, 0.0123, 10**9, RATES) == 0.0123


def test_bound_adds_each_layer_at_the_measured_rates():
    """Static time + per layer max(bytes / bandwidth, mixing / matmul rate) + extra conv MACs at the static
    network's rate + attention MACs at the small-product rate."""
    memory_bound = LayerCost("a", "x", bank_bytes=10**8, kernel_bytes=10**7, map_bytes=10**6, mixing_macs=10**6,
                             attention_macs=2 * 10**5)
    compute_bound = LayerCost("b", "x", bank_bytes=10**6, mixing_macs=10**10, conv_macs=-10**8)
    cost = MethodCost([memory_bound, compute_bound])
    static_s, static_macs = 0.02, 10**9  # 50 GMAC/s
    want = (static_s + (10**8 + 2 * 10**7 + 10**6) / 10e9 + 2 * 10**5 / 2e9
            + 10**10 / 100e9 - 10**8 / 50e9)
    assert latency_bound(cost, static_s, static_macs, RATES) == pytest.approx(want, rel=1e-12)


def test_residual_attention_moves_the_map_three_times():
    """SE on ResNet18 (32 px input): per block the pool reads the map, the scaling reads and writes it."""
    model = dynconv.create_model("resnet18", "se", num_classes=10).eval()
    cost = method_costs(model, (1, 3, 32, 32))
    assert len(cost.layers) == 8
    # ResNet18 block outputs at 32 px: 64 x 8 x 8, 128 x 4 x 4, 256 x 2 x 2, 512 x 1 x 1, two blocks each
    maps = 2 * (64 * 64 + 128 * 16 + 256 * 4 + 512 * 1)
    assert cost.total("map_bytes") == 3 * maps * F32
    assert cost.total("attention_macs") == 2 * sum(2 * c * (c // 16) for c in (64, 128, 256, 512))


def test_batch_above_one_is_refused():
    with pytest.raises(ValueError, match="batch 1"):
        method_costs(nn.Sequential(ODConv2d(4, 4, 3)), (2, 4, 8, 8))


def test_aten_ops_are_counted_per_dispatch():
    """Linear is ``t`` + ``addmm``, ReLU one op, Identity none: the counter sees what eager dispatches."""
    from dynconv.latency_bound import count_aten_ops, dispatch_probe

    assert count_aten_ops(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Identity()), torch.randn(2, 4)) == 3
    run, ops = dispatch_probe(7)
    counter_model = _Call(run)
    assert ops == 7 and count_aten_ops(counter_model, torch.zeros(1)) == 7


class _Call(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn()
