"""torch.compile captures a ResNet stage with MABN layers in one graph, forward and backward, and
computes what eager mode computes (outputs, gradients, rings, counters)."""
import copy
import functools

import torch
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet
from torch import nn
from torch._dynamo.utils import counters

from mabn_det.layers import CentredConv2d, MABN2d


def test_compiled_stage_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    norm = functools.partial(MABN2d, buffer_size=2, warmup_iters=0, renorm_warmup_iters=1)
    stage = nn.Sequential(*ResNet.make_stage(BottleneckBlock, 1, in_channels=8, bottleneck_channels=4,
                                             out_channels=16, norm=norm, stride_in_1x1=False))
    CentredConv2d.convert_convs_before_mabn(stage).train()
    eager = copy.deepcopy(stage)
    torch._dynamo.reset()
    counters.clear()
    # fullgraph: any graph break (in MABN2d's forward, or in its autograd.Function's backward, which
    # AOT autograd traces) raises. aot_eager traces both without compiling kernels, to stay fast.
    compiled = torch.compile(stage, backend="aot_eager", fullgraph=True)
    # Step 1 uses the batch statistics, step 2 the rings' means, step 3 also renormalises (r ≠ 1).
    for step in range(3):
        x = torch.randn(2, 8, 16, 16) * (1 + step)
        outputs = []
        for model in (compiled, eager):
            model.zero_grad()
            y = model(x)
            y.square().mean().backward()
            outputs.append(y)
        torch.testing.assert_close(outputs[0], outputs[1])
        for (name, got), expected in zip(stage.named_parameters(), eager.parameters()):
            torch.testing.assert_close(got.grad, expected.grad, msg=name)
        for (name, got), expected in zip(stage.named_buffers(), eager.buffers()):
            torch.testing.assert_close(got, expected, msg=name)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for all steps: no recompilation
    assert sum(isinstance(m, MABN2d) for m in stage.modules()) == 4
