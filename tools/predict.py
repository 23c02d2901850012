#!/usr/bin/env python
"""Run a trained model on image files: PNGs with the detections drawn, and their instances as JSON.

Works with a YAML training config (MABN or not, with or without MODEL.MABN keys), a LazyConfig
(.py, or the config.yaml that LazyConfig.save writes) and the stock-Detectron2 export of either by
tools/convert_for_deployment.py:

    python tools/predict.py --config-file configs/mask_rcnn_R_50_FPN_2x_mabn_scratch.yaml \
        --weights output/model_final.pth --input photos/ --output predictions/ --confidence 0.5
    python tools/predict.py --config-file configs/lazy/mask_rcnn_R_50_FPN_2x_mabn_scratch.py \
        --weights output/model_final.pth --input photos/ --output predictions/
    python tools/predict.py --config-file output/deploy/config.yaml \
        --weights output/deploy/model_final.pth --input a.jpg b.jpg --output predictions/

Overrides follow the config: KEY VALUE pairs for a YAML config, key=value for a LazyConfig. A
LazyConfig's images are prepared as its ``dataloader.test.mapper`` prepares them (augmentations
and image format).

The output directory receives one PNG per input image (same file name, extension .png) and
``instances.json``: COCO-style results, one dict per detection, with ``file_name`` (the input path)
in place of ``image_id``, ``category_id`` (the dataset's id when its metadata maps one), ``bbox``
(XYWH, input pixels), ``score`` and, for masks, ``segmentation`` (COCO RLE).
"""
import argparse
import json
import os
from collections import abc
from typing import Dict, List

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from tqdm import tqdm

import mabn_det  # noqa: F401  (registers the MABN backbones and heads)
from mabn_det.config import load_config
from mabn_det.lazy import is_lazy_config

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", required=True,
                        help="a YAML config or LazyConfig (MABN or stock export)")
    parser.add_argument("--weights", required=True, help="a checkpoint of that model")
    parser.add_argument("--input", required=True, nargs="+", help="image files and/or directories")
    parser.add_argument("--output", required=True, help="directory for the PNGs and instances.json")
    parser.add_argument("--confidence", type=float, default=0.5,
                        help="keep detections scoring at least this (default 0.5)")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE (YAML) or key=value (LazyConfig)")
    return parser


def load_prediction_config(config_file: str, weights: str, confidence: float,
                           opts: List[str]) -> CfgNode | abc.MutableMapping:
    """The config, set to load `weights` and to keep detections scoring at least `confidence`.

    A YAML config is read with `load_config` (Detectron2's defaults and `cfg.MODEL.MABN`'s, so a
    config that writes NORM "MABN" without MABN keys gets the defaults); a LazyConfig (an omegaconf
    DictConfig) with `LazyConfig.load`.

    Raises:
        FileNotFoundError: naming the missing config or weights file.
    """
    for kind, path in (("config", config_file), ("weights", weights)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{'config-file' if kind == 'config' else kind} {path!r}: "
                                    f"no such {kind} file")
    on_cpu = not torch.cuda.is_available()
    if is_lazy_config(config_file):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
        cfg.train.init_checkpoint = weights
        for node in (cfg.model, cfg.model.get("roi_heads", {}).get("box_predictor", {})):
            if "test_score_thresh" in node:
                node.test_score_thresh = confidence
        if on_cpu:
            cfg.train.device = "cpu"
        return cfg
    cfg = load_config(config_file, opts)
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = confidence
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = confidence
    if cfg.MODEL.DEVICE.startswith("cuda") and on_cpu:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


class LazyConfigPredictor:
    """Detectron2's DefaultPredictor for a LazyConfig: ``cfg.model`` with the weights of
    ``cfg.train.init_checkpoint``, fed one image as ``cfg.dataloader.test.mapper`` feeds it."""

    def __init__(self, cfg: abc.MutableMapping):
        self.model = instantiate(cfg.model).to(cfg.train.device).eval()
        DetectionCheckpointer(self.model).load(cfg.train.init_checkpoint)
        mapper = cfg.dataloader.test.mapper
        self.augmentations = T.AugmentationList(list(instantiate(mapper.augmentations)))
        self.image_format = mapper.image_format

    def __call__(self, original_image: np.ndarray) -> dict:
        """Args: original_image: (H, W, 3) BGR. Returns: the model's output for the image."""
        height, width = original_image.shape[:2]
        image = original_image[:, :, ::-1] if self.image_format == "RGB" else original_image
        augmented = T.AugInput(image)
        self.augmentations(augmented)
        tensor = torch.as_tensor(augmented.image.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            return self.model([{"image": tensor, "height": height, "width": width}])[0]


def dataset_names(cfg: CfgNode | abc.MutableMapping) -> List[str]:
    """The datasets whose metadata names the classes: the test sets, else the training sets."""
    if isinstance(cfg, CfgNode):
        return list(cfg.DATASETS.TEST or cfg.DATASETS.TRAIN)
    for split in ("test", "train"):
        names = cfg.dataloader.get(split, {}).get("dataset", {}).get("names")
        if names:
            return [names] if isinstance(names, str) else list(names)
    return []


def image_paths(inputs: List[str]) -> List[str]:
    """The files in `inputs`, with each directory replaced by its image files (sorted).

    Raises:
        FileNotFoundError: an input that does not exist.
        ValueError: a directory without images, or two images with the same file name (their PNGs
            would overwrite each other).
    """
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item)
                           if name.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ValueError(f"--input directory {item!r} holds no image "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"--input {item!r}: no such file or directory")
    names: Dict[str, str] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in names:
            raise ValueError(f"--input {names[stem]!r} and {path!r} would both be written as "
                             f"{stem}.png; pass them in separate runs")
        names[stem] = path
    return paths


def main(args: argparse.Namespace) -> List[dict]:
    """Predict on every input image; returns the detections written to instances.json."""
    cfg = load_prediction_config(args.config_file, args.weights, args.confidence, args.opts)
    paths = image_paths(args.input)
    predictor = DefaultPredictor(cfg) if isinstance(cfg, CfgNode) else LazyConfigPredictor(cfg)
    datasets = dataset_names(cfg)
    metadata = MetadataCatalog.get(datasets[0]) if datasets else MetadataCatalog.get("__unused")
    # COCO-style results name the dataset's category ids; the model predicts contiguous indices.
    to_dataset_id = {v: k for k, v in
                     getattr(metadata, "thing_dataset_id_to_contiguous_id", {}).items()}
    os.makedirs(args.output, exist_ok=True)
    results = []
    for path in tqdm(paths, desc="Images", unit="image"):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:
            raise ValueError(f"--input {path!r} could not be read as an image: {e}") from e
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= args.confidence]
        drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        stem = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(drawn.get_image()).save(os.path.join(args.output, f"{stem}.png"))
        for detection in instances_to_coco_json(instances, img_id=None):
            del detection["image_id"]
            detection["category_id"] = to_dataset_id.get(detection["category_id"],
                                                          detection["category_id"])
            results.append({"file_name": path, **detection})
    with open(os.path.join(args.output, "instances.json"), "w") as f:
        json.dump(results, f)
    return results


if __name__ == "__main__":
    main(argument_parser().parse_args())
