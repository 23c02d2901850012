"""PerLevelMABN2d: per-level MABN statistics with one γ and β, conversions, centred convs."""
import torch
from detectron2.layers import Conv2d, CycleBatchNormList
from torch import nn

from mabn_det.layers import CentredConv2d, MABN2d, PerLevelMABN2d, convert_to_inference_form

KWARGS = dict(buffer_size=2, warmup_iters=0, renorm_warmup_iters=1)


def _level_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Levels of different scale, as FPN levels are: one shared ring would mix them.
    return [torch.randn(2, 4, 6 - k, 6 - k, generator=g, dtype=torch.float64) * (1 + 3 * k)
            for k in range(3)]


def test_each_level_is_an_mabn2d_of_its_own_with_shared_affine():
    torch.manual_seed(0)
    per_level = PerLevelMABN2d(3, 4, **KWARGS).double()
    separate = [MABN2d(4, **KWARGS).double() for _ in range(3)]
    with torch.no_grad():
        per_level.weight.uniform_(0.5, 2.0)
        per_level.bias.uniform_(-1.0, 1.0)
        for m in separate:
            m.weight.copy_(per_level.weight)
            m.bias.copy_(per_level.bias)
    for step in range(3):  # past the warm-ups: averaged statistics and r ≠ 1
        xs = _level_inputs(step)
        ys = [per_level(x) for x in xs]
        expected = [m(x) for m, x in zip(separate, xs)]
        for y, e in zip(ys, expected):
            torch.testing.assert_close(y, e)
        grads = [torch.randn_like(y) for y in ys]
        torch.autograd.backward(ys, grads)
        torch.autograd.backward(expected, grads)
    torch.testing.assert_close(per_level.weight.grad, sum(m.weight.grad for m in separate))
    torch.testing.assert_close(per_level.bias.grad, sum(m.bias.grad for m in separate))
    for level, m in zip(per_level.levels, separate):
        assert level.weight is per_level.weight and level.bias is per_level.bias
        assert int(level.iteration) == 3
        for name in ("chi_buffer", "psi_buffer", "running_var"):
            torch.testing.assert_close(getattr(level, name), getattr(m, name), msg=name)
    assert len(list(per_level.parameters())) == 2


def test_inference_form_is_detectron2s_per_level_bn():
    per_level = PerLevelMABN2d(3, 4, **KWARGS, eps=1e-3)
    for step in range(3):
        for x in _level_inputs(step):
            per_level(x.float())
    with torch.no_grad():
        per_level.weight.uniform_(0.5, 2.0)
        per_level.bias.uniform_(-1.0, 1.0)
    holder = nn.Sequential(per_level).eval()
    converted = convert_to_inference_form(holder)
    cycle = converted[0]
    assert type(cycle) is CycleBatchNormList and not cycle.training
    # Stock Detectron2 builds it with BatchNorm2d's default ε: the state dict must carry the rest.
    stock = CycleBatchNormList(length=3, bn_class=nn.BatchNorm2d, num_features=4).eval()
    stock.load_state_dict(cycle.state_dict())
    with torch.no_grad():
        for x in _level_inputs(7):
            torch.testing.assert_close(stock(x.float()), holder(x.float()), rtol=1e-5, atol=1e-5)


def test_replaces_cycle_batch_norms_and_centres_the_plain_convs_before_them():
    subnet = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), CycleBatchNormList(length=2, num_features=4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
    )
    head = nn.Module()
    head.subnet = subnet
    keys = set(head.state_dict())
    PerLevelMABN2d.replace_cycle_batch_norms(head, **KWARGS)
    CentredConv2d.convert_convs_before_mabn(head)
    assert type(subnet[1]) is PerLevelMABN2d and len(subnet[1].levels) == 2
    assert type(subnet[0]) is CentredConv2d and type(subnet[3]) is nn.Conv2d
    # The conv keys stay those of nn.Conv2d, so the inference form loads into stock Detectron2.
    assert {k for k in head.state_dict() if k.startswith("subnet.0.")} == \
        {k for k in keys if k.startswith("subnet.0.")}

    x = torch.randn(2, 4, 5, 5)
    for _ in range(2):  # one training step: one call per level
        assert torch.isfinite(subnet(x)).all()
    with torch.no_grad():
        subnet[0].weight.add_(torch.randn(4, 1, 1, 1) * 5)  # invisible to a centred conv
    subnet.eval()
    inference = convert_to_inference_form(subnet)
    assert type(inference[0]) is Conv2d and inference[0].norm is None
    torch.testing.assert_close(inference[0](x), subnet[0](x))


def test_precise_bn_estimates_each_level_from_its_own_inputs():
    from mabn_det.engine.hooks import update_mabn_stats

    class SharedNorm(nn.Module):  # a norm shared by the levels, as in RetinaNet's head
        def __init__(self):
            super().__init__()
            self.norm = PerLevelMABN2d(3, 4, **KWARGS)

        def forward(self, levels):
            return [self.norm(x) for x in levels]

    model = SharedNorm()
    batches = [[x.float() for x in _level_inputs(seed)] for seed in range(4)]
    update_mabn_stats(model, batches, num_iter=4)
    for k, level in enumerate(model.norm.levels):
        expected = torch.stack([b[k].square().mean(dim=(0, 2, 3)) for b in batches]).mean(0)
        torch.testing.assert_close(level.running_var, expected)
        assert int(level.iteration) == 0  # the estimation restores the step counters
