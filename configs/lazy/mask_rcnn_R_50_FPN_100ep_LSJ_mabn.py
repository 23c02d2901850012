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

# 8 images per GPU on 8 GPUs: m = 16 steps average the statistics of 128 images per GPU. Warm-ups
# as the paper's (100 steps, renormalisation from 1000 of the 184k steps).
mabn = L(mabn_norm)(buffer_size=16, warmup_iters=100, renorm_warmup_iters=1000, renorm_clip=5.0,
                    momentum=0.02, eps=1e-5)
model.backbone.bottom_up.stem.norm = "${mabn}"
model.backbone.bottom_up.stages.norm = "${mabn}"
model.backbone.norm = "${mabn}"
model.roi_heads.box_head.conv_norm = "${mabn}"
model.roi_heads.mask_head.conv_norm = "${mabn}"
# MABN's γ and β take weight_decay_norm, as Detectron2's norms do, in any training script.
optimizer.params._target_ = mabn_optimizer_params
# The resumable data stream (Detectron2's loader arguments): a resume continues it exactly.
dataloader.train._target_ = build_resumable_train_loader

# mabn_det's LazyTrainer keys (tools/lazyconfig_train_net.py). Accumulation stays 1: the recipe
# trains with AMP, which MABN supports (statistics in float32) but accumulation does not.
train.grad_accumulation_steps = 1
train.mabn_log_period = 20
train.precise_bn = dict(enabled=False, num_iter=200)
# As the YAML recipes: the last 3 periodic checkpoints stay (and model_final.pth), those of
# requeued runs included; Detectron2's common/train.py keeps 100.
train.checkpointer.max_to_keep = 3
train.preemption_signals = ["SIGUSR1"]  # SLURM's --signal: checkpoint, requeue, exit 75
