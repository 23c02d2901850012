#!/usr/bin/env python
"""Train or evaluate a Detectron2 model whose configs may use NORM: "MABN".

Same arguments as Detectron2's tools/train_net.py, plus --register-coco NAME JSON IMAGE_DIR:

    python tools/train_net.py --config-file configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml \
        --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
"""
from detectron2.engine import launch

from mabn_det.engine.cli import argument_parser, main

if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
