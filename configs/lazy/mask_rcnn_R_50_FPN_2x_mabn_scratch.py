# The paper's recipe (Yan et al. 2020, COCO) as a LazyConfig: the twin of
# configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml. Mask R-CNN R50-FPN from scratch, 2 images per GPU
# x 8 GPUs, MABN in every normalised layer (backbone, FPN, 4conv1fc box head, mask head), no
# cross-GPU communication in any norm. Paper: 36.5 box AP.
#   python tools/lazyconfig_train_net.py --num-gpus 8 \
#       --config-file configs/lazy/mask_rcnn_R_50_FPN_2x_mabn_scratch.py
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from mabn_det.engine import build_resumable_train_loader
from mabn_det.lazy import as_mabn_model, mabn_norm
from mabn_det.solver import mabn_optimizer_params

# instantiate(model) builds the model, centres the convs that feed MABN and checks it
# (mabn_det.lazy.as_mabn_model); its keys stay where Detectron2's config has them.
model = as_mabn_model(get_config("common/models/mask_rcnn_fpn.py").model)
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train
# 2x: 180k iterations of 16 images, lr x0.1 at 120k and 160k, 1000 linear warm-up iterations.
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_2x

# One set of MABN settings for every site (override once: mabn.buffer_size=8): MABNSettings'
# defaults, the paper's. m = 16 steps of 2 images: statistics over 32 images.
mabn = L(mabn_norm)()
model.backbone.bottom_up.stem.norm = "${mabn}"
model.backbone.bottom_up.stages.norm = "${mabn}"
model.backbone.norm = "${mabn}"
model.roi_heads.box_head.conv_norm = "${mabn}"
model.roi_heads.mask_head.conv_norm = "${mabn}"
# MABN's γ and β take weight_decay_norm, as Detectron2's norms do, in any training script.
optimizer.params._target_ = mabn_optimizer_params

# As Base-RCNN-FPN-scratch.yaml: nothing pre-trained, so nothing frozen; stride in the 3x3 conv;
# Detectron2's default pixel statistics (std 1).
train.init_checkpoint = ""
model.backbone.bottom_up.freeze_at = 0
model.backbone.bottom_up.stages.stride_in_1x1 = False
model.pixel_mean = [103.53, 116.28, 123.675]
model.pixel_std = [1.0, 1.0, 1.0]
# 4conv1fc box head, as the paper and Detectron2's GN/SyncBN configs.
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]

dataloader.train.total_batch_size = 16
# The resumable data stream (Detectron2's loader arguments): a resume continues it exactly.
dataloader.train._target_ = build_resumable_train_loader
optimizer.lr = 0.02
train.max_iter = 180000
train.eval_period = 0  # evaluate once, at the end
# tools/lazyconfig_train_net.py's own train keys (grad_accumulation_steps, mabn_log_period,
# precise_bn, preemption_signals; see mabn_det.engine.lazy_training) keep their defaults. As the
# YAML recipe: a checkpoint every 10k iterations, the last 3 kept (Detectron2's common/train.py
# keeps 100), those of requeued runs included.
train.checkpointer = dict(period=10000, max_to_keep=3)
