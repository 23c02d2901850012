import io

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

import mabn_det
from mabn_det.layers import MABN2d, CentredConv2d, convert_to_inference_form


def _trained_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        CentredConv2d(3, 8, 3, padding=1, bias=False, norm=MABN2d(8, buffer_size=2, warmup_iters=2, renorm_warmup_iters=3), activation=nn.ReLU()),
        CentredConv2d(8, 4, 3, padding=1, bias=False, norm=MABN2d(4, buffer_size=2, warmup_iters=2, renorm_warmup_iters=3)),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(8):
        opt.zero_grad()
        net(torch.randn(2, 3, 8, 8) * 3 + 1).square().mean().backward()
        opt.step()
    return net.eval()


def _mabn_classes(model):
    return [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("mabn_det")]


def test_inference_form_matches_and_has_no_mabn_class():
    net = _trained_net()
    x = torch.randn(3, 3, 8, 8)
    expected = net(x)
    for fold in (False, True):
        converted = convert_to_inference_form(net, fold_into_conv=fold)
        assert _mabn_classes(converted) == []
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(convert_to_inference_form(net)[0].norm, FrozenBatchNorm2d)
    assert convert_to_inference_form(net, fold_into_conv=True)[0].norm is None
    assert _mabn_classes(net) != [], "the default must convert a copy"


def test_inplace_conversion_keeps_conv_identity():
    net = _trained_net()
    first = net[0]
    out = convert_to_inference_form(net, inplace=True)
    assert out is net and net[0] is first and type(first) is Conv2d


def test_inference_form_traces_and_exports_to_onnx():
    converted = convert_to_inference_form(_trained_net(), fold_into_conv=False)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():  # inference export, as Detectron2's own tracing does
        traced = torch.jit.trace(converted, x)
        torch.testing.assert_close(traced(x), converted(x))
        blob = io.BytesIO()
        torch.onnx.export(converted, (x,), blob, dynamo=False)
    import onnx

    graph = onnx.load_from_string(blob.getvalue()).graph
    assert {n.op_type for n in graph.node} >= {"Conv"}


def test_public_api_exports():
    assert mabn_det.MABN2d is MABN2d and mabn_det.CentredConv2d is CentredConv2d
