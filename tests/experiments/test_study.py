import json
import os

import pytest

from mabn_experiments.study import ARMS, IMAGES_PER_STEP, configure_arm, summarise
from tests.common import make_cfg


@pytest.mark.parametrize("arm", list(ARMS))
def test_arms_share_the_optimizer_batch_and_differ_in_normalisation(arm):
    cfg = make_cfg(opts=["MODEL.MABN.WARMUP_ITERS", "10", "MODEL.MABN.RENORM_WARMUP_ITERS", "30"])
    configure_arm(cfg, ARMS[arm])
    assert cfg.SOLVER.IMS_PER_BATCH == IMAGES_PER_STEP
    images_per_forward = IMAGES_PER_STEP // cfg.SOLVER.GRAD_ACCUMULATION_STEPS
    assert images_per_forward == int(arm.split("@")[1])
    norms = {cfg.MODEL.RESNETS.NORM, cfg.MODEL.FPN.NORM, cfg.MODEL.ROI_BOX_HEAD.NORM,
             cfg.MODEL.ROI_MASK_HEAD.NORM}
    assert norms == {ARMS[arm].norm}
    if arm == "MABN@2":  # 8 buffered micro-batches of 2: statistics of 16 images
        assert cfg.MODEL.MABN.BUFFER_SIZE * images_per_forward == 16
        assert (cfg.MODEL.MABN.WARMUP_ITERS, cfg.MODEL.MABN.RENORM_WARMUP_ITERS) == (80, 240)


def test_summary_aggregates_seeds(tmp_path):
    for arm, aps in {"BN@2": [10.0, 12.0], "MABN@2": [20.0, 22.0]}.items():
        for seed, ap in enumerate(aps):
            run = tmp_path / arm / f"seed{seed}"
            os.makedirs(run)
            (run / "result.json").write_text(json.dumps(
                {"arm": arm, "seed": seed, "bbox_AP": ap, "segm_AP": ap / 2}))
            (run / "metrics.json").write_text(
                "\n".join(json.dumps({"iteration": i, "total_loss": 2.0 / (i + 1)}) for i in range(5))
                + "\n" + json.dumps({"iteration": 4, "bbox/AP": ap, "segm/AP": ap / 2}) + "\n")
    table = summarise(str(tmp_path), "test")
    assert "| BN@2 | BN | 2 | 11.0 ± 1.4 | 5.5 ± 0.7 | 0, 1 |" in table
    assert "| MABN@2 | MABN | 16 | 21.0 ± 1.4 |" in table
    for png in ("bbox_AP.png", "segm_AP.png", "curves.png"):
        assert (tmp_path / png).stat().st_size > 1000
