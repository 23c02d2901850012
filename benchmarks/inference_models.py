"""The models and inputs of benchmarks/bench_inference.py: five eval-mode variants of one Mask R-CNN
R50-FPN (MABN folded, MABN as FrozenBN, GN, FrozenBN, MABN as trained), the two programs timed
(backbone+FPN, heads) and the photographs they run on."""
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

import common
from mabn_det import MABN2d, convert_to_inference_form
from mabn_det.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "MABN": "configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml",
    "GN": "configs/mask_rcnn_R_50_FPN_2x_gn_scratch.yaml",
    "FrozenBN": "configs/mask_rcnn_R_50_FPN_2x_bn_scratch.yaml",
}
FOLDED, AS_FROZEN, GN, FROZEN, AS_TRAINED = (
    "(a) MABN folded", "(b) MABN→FrozenBN", "(c) GN", "(d) FrozenBN", "MABN as trained")
EXPORTED = (FOLDED, AS_FROZEN, GN, FROZEN)  # the variants a deployment would ship
EAGER, TORCHSCRIPT, ORT = "eager", "TorchScript", "ONNX Runtime"
# R18 with narrow heads: the same code paths at a fraction of the cost (smoke runs, tests).
TINY_OPTS = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
             "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64,
             "MODEL.ROI_BOX_HEAD.FC_DIM", 128, "MODEL.ROI_MASK_HEAD.CONV_DIM", 64]
CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea")
HELD_OUT_PHOTOS = ("rocket", "immunohistochemistry", "cat")


class Setting:
    """One batch configuration: `batch` images of `height`×`width`, fixed RoI counts per image."""

    def __init__(self, batch: int, height: int, width: int, proposals: int, detections: int):
        self.batch, self.height, self.width = batch, height, width
        self.proposals, self.detections = proposals, detections

    @property
    def name(self) -> str:
        return f"batch {self.batch}, {self.height}×{self.width}"

    def describe(self) -> str:
        return (f"{self.name}, {self.proposals} proposals and {self.detections} detections "
                f"per image")


class BackboneFPN(nn.Module):
    """(B, 3, H, W) normalised images → the FPN levels p2…p6 as a tuple (traceable)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        features = self.backbone(images)
        return tuple(features[k] for k in sorted(features))


class Heads(nn.Module):
    """The normalised RoI heads on pooled features.

    forward(box_features (R, C, 7, 7), mask_features (D, C, 14, 14)) →
    (class scores (R, K+1), box deltas (R, 4K), mask logits (D, K, 28, 28)).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.box_head = model.roi_heads.box_head
        self.box_predictor = model.roi_heads.box_predictor
        self.mask_head = model.roi_heads.mask_head

    def forward(self, box_features: torch.Tensor, mask_features: torch.Tensor):
        scores, deltas = self.box_predictor(self.box_head(box_features))
        return scores, deltas, self.mask_head.layers(mask_features)


# ------------------------------------------------------------------------------------------------
# Models


def _config(norm: str, setting: Setting, opts: Sequence):
    fixed_counts = [
        "MODEL.DEVICE", "cpu",
        "MODEL.RPN.NMS_THRESH", 1.0,  # IoU > 1 never happens: no proposal is suppressed
        "MODEL.RPN.POST_NMS_TOPK_TEST", setting.proposals,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST", 1.0,
        "TEST.DETECTIONS_PER_IMAGE", setting.detections,
    ]
    norms = [v for key in common.NORM_KEYS for v in (key, "FrozenBN")] if norm == "FrozenBN" else []
    return load_config(os.path.join(REPO, CONFIGS[norm]), fixed_counts + norms + list(opts))


@torch.no_grad()
def calibrate_norms(model: nn.Module, images: torch.Tensor) -> None:
    """Set every MABN2d / FrozenBatchNorm2d statistic from the data that reaches it.

    One eval forward of the whole model with a pre-hook per norm layer: each layer's statistic is
    set from its own input before it normalises it, so later layers see calibrated earlier ones.
    MABN gets the second moment χ = mean(x²) (its inference statistic), FrozenBN the mean and
    variance.

    Args:
        images: (N, 3, H, W) float BGR pixels in [0, 255].
    """
    def set_stats(module, inputs):
        x = inputs[0]
        if isinstance(module, MABN2d):
            module.running_var.copy_(x.pow(2).mean((0, 2, 3)))
        else:
            module.running_mean.copy_(x.mean((0, 2, 3)))
            module.running_var.copy_(x.var((0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules()
             if isinstance(m, (MABN2d, FrozenBatchNorm2d))]
    try:
        model.inference(model_inputs(images), do_postprocess=False)
    finally:
        for h in hooks:
            h.remove()


def build_variants(setting: Setting, opts: Sequence,
                   calibration: torch.Tensor) -> Dict[str, nn.Module]:
    """The five eval-mode models: same architecture, `setting`'s RoI counts, norms calibrated.

    Args:
        opts: KEY VALUE config overrides applied to every variant.
        calibration: (N, 3, H, W) float BGR images in [0, 255] for `calibrate_norms`.

    Returns:
        Variant name (FOLDED, AS_FROZEN, GN, FROZEN, AS_TRAINED) → model on the CPU.
    """
    variants = {}
    torch.manual_seed(0)
    mabn = build_model(_config("MABN", setting, opts)).eval()
    calibrate_norms(mabn, calibration)
    variants[FOLDED] = convert_to_inference_form(mabn, fold_into_conv=True)
    variants[AS_FROZEN] = convert_to_inference_form(mabn)
    torch.manual_seed(0)
    variants[GN] = build_model(_config("GN", setting, opts)).eval()
    torch.manual_seed(0)
    frozen = build_model(_config("FrozenBN", setting, opts)).eval()
    calibrate_norms(frozen, calibration)
    variants[FROZEN] = frozen
    variants[AS_TRAINED] = mabn
    return variants


def set_counts(model: nn.Module, setting: Setting) -> None:
    """Point a built model at `setting`'s RoI counts (they are plain attributes after build)."""
    model.proposal_generator.post_nms_topk = {False: setting.proposals, True: setting.proposals}
    model.roi_heads.box_predictor.test_topk_per_image = setting.detections


# ------------------------------------------------------------------------------------------------
# Inputs


def photographs(names: Sequence[str], height: int, width: int) -> torch.Tensor:
    """scikit-image's bundled photographs as (N, 3, height, width) float BGR in [0, 255]."""
    import skimage.data

    out = []
    for name in names:
        rgb = getattr(skimage.data, name)()
        if rgb.ndim == 2:
            rgb = np.stack([rgb] * 3, axis=-1)
        x = torch.from_numpy(np.ascontiguousarray(rgb[..., 2::-1])).permute(2, 0, 1).float()
        out.append(nn.functional.interpolate(x[None], size=(height, width), mode="bilinear",
                                             align_corners=False)[0])
    return torch.stack(out)


def batch_of(photos: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` images cycling through `photos` (N, 3, H, W)."""
    return photos[torch.arange(batch) % len(photos)].contiguous()


def model_inputs(images: torch.Tensor) -> List[dict]:
    return [{"image": im, "height": im.shape[1], "width": im.shape[2]} for im in images]


def normalise(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What GeneralizedRCNN feeds its backbone: (x − PIXEL_MEAN) / PIXEL_STD."""
    return (images - model.pixel_mean) / model.pixel_std


def head_inputs(model: nn.Module, setting: Setting, seed: int = 0):
    """Random pooled features: (B·PROPOSALS, C, 7, 7) and (B·DETECTIONS, C, 14, 14).

    Their values do not change the cost of dense convs; their shapes are what the heads see.
    """
    g = torch.Generator().manual_seed(seed)
    channels = model.backbone.output_shape()["p2"].channels
    box = torch.randn(setting.batch * setting.proposals, channels, 7, 7, generator=g)
    mask = torch.randn(setting.batch * setting.detections, channels, 14, 14, generator=g)
    return box, mask
