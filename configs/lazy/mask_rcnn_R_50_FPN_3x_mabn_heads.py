# MABN heads on Detectron2's pretrained R-50, as a LazyConfig: the twin of
# configs/mask_rcnn_R_50_FPN_3x_mabn_heads.yaml. The backbone is Detectron2's
# common/models/mask_rcnn_fpn.py as shipped (FrozenBN, stride in the 1x1 conv, BGR inputs with
# MSRA's pixel statistics), its stem and res2 frozen; MABN in the FPN, the 4conv1fc box head and
# the mask head, where Detectron2's GN and SyncBN recipes put their norm; 3x schedule.
#   python tools/lazyconfig_train_net.py --num-gpus 8 \
#       --config-file configs/lazy/mask_rcnn_R_50_FPN_3x_mabn_heads.py
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from mabn_det.lazy import as_mabn_model, mabn_norm
from mabn_det.solver import mabn_optimizer_params

# instantiate(model) builds the model, centres the convs that feed MABN and checks it
# (mabn_det.lazy.as_mabn_model); its keys stay where Detectron2's config has them.
model = as_mabn_model(get_config("common/models/mask_rcnn_fpn.py").model)
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x

mabn = L(mabn_norm)()
model.backbone.norm = "${mabn}"
model.roi_heads.box_head.conv_norm = "${mabn}"
model.roi_heads.mask_head.conv_norm = "${mabn}"
# MABN's γ and β take weight_decay_norm, as Detectron2's norms do, in any training script.
optimizer.params._target_ = mabn_optimizer_params

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
model.backbone.bottom_up.freeze_at = 2
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
train.max_iter = 270000  # 3x at 16 images per step

# mabn_det's LazyTrainer keys (tools/lazyconfig_train_net.py).
train.grad_accumulation_steps = 1
train.mabn_log_period = 20
train.precise_bn = dict(enabled=False, num_iter=200)
