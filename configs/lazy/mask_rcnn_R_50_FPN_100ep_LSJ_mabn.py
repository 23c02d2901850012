# Detectron2's strongest from-scratch R50 recipe, new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py
# (large-scale jitter at 1024 px, 64 images per step, AMP, 100 epochs; 44.6 box / 40.3 mask AP with
# SyncBN), with MABN in place of every SyncBN: backbone, FPN and both heads. MABN needs no
# communication between GPUs and handles the heads' empty batches, for which the recipe had to use
# NaiveSyncBatchNorm(stats_mode="N").
#   python tools/lazyconfig_train_net.py --num-gpus 8 \
#       --config-file configs/lazy/mask_rcnn_R_50_FPN_100ep_LSJ_mabn.py
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from mabn_det.engine import build_resumable_train_loader
from mabn_det.lazy import as_mabn_model, mabn_norm
from mabn_det.solver import mabn_optimizer_params

_base = get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
model, dataloader, optimizer, train, lr_multiplier = (
    _base.model, _base.dataloader, _base.optimizer, _base.train, _base.lr_multiplier)
# instantiate(model) builds the model, centres the convs that feed MABN and checks it
# (mabn_det.lazy.as_mabn_model); its keys stay where Detectron2's config has them.
model = as_mabn_model(model)

# The paper's rule for the buffer: m forwards of the images on one GPU make a statistic of about 32
# images (its 16 × 2). With 8 images per GPU that is m = 4; the warm-ups are the paper's (100
# forwards of batch statistics, renormalisation from 1000 of the 184k).
mabn = L(mabn_norm)(buffer_size=4)
model.backbone.bottom_up.stem.norm = "${mabn}"
model.backbone.bottom_up.stages.norm = "${mabn}"
model.backbone.norm = "${mabn}"
model.roi_heads.box_head.conv_norm = "${mabn}"
model.roi_heads.mask_head.conv_norm = "${mabn}"
# MABN's γ and β take weight_decay_norm, as Detectron2's norms do, in any training script.
optimizer.params._target_ = mabn_optimizer_params
# The resumable data stream (Detectron2's loader arguments): a resume continues it exactly.
dataloader.train._target_ = build_resumable_train_loader

# tools/lazyconfig_train_net.py's own train keys (see mabn_det.engine.lazy_training) keep their
# defaults. Accumulation (train.grad_accumulation_steps) stays 1: the recipe trains with AMP, which
# MABN supports (statistics in float32) but accumulation does not.
# As the YAML recipes: the last 3 periodic checkpoints stay (and model_final.pth), those of
# requeued runs included; Detectron2's common/train.py keeps 100.
train.checkpointer.max_to_keep = 3
