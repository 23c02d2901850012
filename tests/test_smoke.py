"""The environment works: Detectron2 imports beside mabn_det and a stock Mask R-CNN trains on CPU."""
import json
import subprocess
import sys

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import mabn_det  # noqa: F401
from tests.common import REPO, make_cfg, synthetic_image


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


def test_import_loads_only_torch_and_detectron2_and_registers_no_dataset():
    """`import mabn_det` in a fresh process: no experiment dependency, no dataset, nothing printed."""
    code = """
import json, os, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mabn_det
# Ours = raised from a file inside the package, wherever the clone or its venv lives (a clone named
# mabn_det holds .venv/.../detectron2, whose own warnings are not ours).
package_dir = os.path.realpath(os.path.dirname(mabn_det.__file__)) + os.sep
from detectron2.data import DatasetCatalog
from detectron2.modeling import BACKBONE_REGISTRY
print(json.dumps({
    "modules": sorted({m.split(".")[0] for m in sys.modules}),
    "datasets": DatasetCatalog.list(),
    "ours_warned": [f"{w.filename}: {w.message}" for w in caught
                    if os.path.realpath(w.filename).startswith(package_dir)],
    "registered": "build_mabn_resnet_fpn_backbone" in BACKBONE_REGISTRY,
}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.stdout.strip().count("\n") == 0, "import printed something"
    # (Detectron2's engine itself imports cv2, so it is not ours to avoid.)
    heavy = {"skimage", "scipy", "matplotlib", "mabn_experiments", "sklearn"}
    assert heavy.isdisjoint(report["modules"]), heavy & set(report["modules"])
    assert not [d for d in report["datasets"] if d.startswith("shapes")]
    assert report["ours_warned"] == []
    assert report["registered"]
