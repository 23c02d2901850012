"""The environment works: Detectron2 imports beside mabn_det and a stock Mask R-CNN trains on CPU."""
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import mabn_det  # noqa: F401
from tests.conftest import make_cfg, synthetic_image


def test_stock_mask_rcnn_trains_one_step_on_cpu():
    torch.manual_seed(0)
    cfg = make_cfg(opts=["MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
                         "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "",
                         "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NORM", "",
                         "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead",
                         "MODEL.ROI_MASK_HEAD.NORM", ""])
    model = build_model(cfg)
    assert not any(type(m).__module__.startswith("mabn_det") for m in model.modules())
    batch = [synthetic_image(boxes=[(4, 4, 40, 30)], seed=s) for s in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with EventStorage():
        losses = model(batch)
        total = sum(losses.values())
        total.backward()
        optimizer.step()
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls"} <= set(losses)
    assert torch.isfinite(total)
