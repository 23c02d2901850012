"""The MABN sites, where NORM "MABN" may be written: each module of mabn_det that resolves it is
registered with `mabn_site`, which records what the module reads and which stock Detectron2 module
it extends. The check of a model's config and its stock counterpart for deployment read these
records.
"""
import dataclasses
from typing import Callable, Dict, List, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.utils.registry import Registry

from ..config import RESUMABLE_SAMPLER, get_key, mabn_norm_keys, mabn_settings, set_key

__all__ = ["MABNSite", "check_mabn_config", "mabn_site", "stock_inference_config",
           "supported_norm_keys"]


@dataclasses.dataclass(frozen=True)
class MABNSite:
    """What one registered module of mabn_det does with NORM "MABN".

    Attributes:
        name: the module's registered name, e.g. "build_mabn_resnet_fpn_backbone".
        name_key: the config key that names it, e.g. "MODEL.BACKBONE.NAME".
        stock: the stock Detectron2 module it extends, registered under the same key.
        norm_keys: the NORM keys that `stock` reads and this module resolves.
        built_by: the meta-architectures whose models build the module that `name_key` names;
            empty: every one.
        only_stock_reads: True when, of the modules `name_key` may name, only `stock` reads
            `norm_keys` (Res5ROIHeads among ROI heads, RetinaNet among meta-architectures), so
            another name there leaves them unread; False when any module named there is taken to
            read them, so that only ours may be named.
        inference_norm: the norm that `stock` is given in place of "MABN" to run the inference
            form of this module (`stock_inference_config`).
    """

    name: str
    name_key: str
    stock: str
    norm_keys: Tuple[str, ...]
    built_by: Tuple[str, ...] = ()
    only_stock_reads: bool = False
    inference_norm: str = "FrozenBN"

    def reads_norm_keys(self, cfg: CfgNode) -> bool:
        """Whether, as far as this site knows, the model of `cfg` reads `norm_keys` through the
        module that `name_key` names (which must then be ours where they are "MABN")."""
        if self.built_by and cfg.MODEL.META_ARCHITECTURE not in self.built_by:
            return False
        return not self.only_stock_reads or get_key(cfg, self.name_key) == self.stock


# Filled by `mabn_site` as mabn_det.modeling is imported: registered name -> its site.
_SITES: Dict[str, MABNSite] = {}


def mabn_site(registry: Registry, name_key: str, stock: Callable, norm_keys: Sequence[str], *,
              built_by: Sequence[str] = (), only_stock_reads: bool = False,
              inference_norm: str = "FrozenBN") -> Callable:
    """A decorator that registers a builder or class in Detectron2's `registry` and records it as a
    `MABNSite`: the one registration a new MABN module needs.

    Args:
        registry: the Detectron2 registry whose config key is `name_key`.
        stock: the stock Detectron2 builder or class that the decorated one extends.
        name_key, norm_keys, built_by, only_stock_reads, inference_norm: see `MABNSite`.
    """
    def register(obj):
        registry.register(obj)
        _SITES[obj.__name__] = MABNSite(obj.__name__, name_key, stock.__name__, tuple(norm_keys),
                                        tuple(built_by), only_stock_reads, inference_norm)
        return obj
    return register


def supported_norm_keys() -> List[str]:
    """The NORM keys where "MABN" may be written, in the order they were registered."""
    return list(dict.fromkeys(key for site in _SITES.values() for key in site.norm_keys))


def check_mabn_config(cfg: CfgNode) -> None:
    """Refuse, before the model is built, a config whose NORM "MABN" it cannot build as written.

    `mabn_det.engine.Trainer.build_model` runs it once per build (Detectron2's `build_model` does
    not; our modules still resolve their norms and check the model they build, see
    `mabn_det.modeling.prepare_mabn_model`). A NORM that the model never reads may be "MABN", as
    Detectron2 ignores it. The training settings have their own check,
    `mabn_det.config.check_training_config`.

    Raises:
        ValueError: naming the offending key, its value and the setting to use instead.
    """
    mabn_settings(cfg)
    for key in mabn_norm_keys(cfg):
        sites = [site for site in _SITES.values() if key in site.norm_keys]
        if not sites:
            raise ValueError(f'cfg.{key} = "MABN" is not supported; MABN works in '
                             f"{', '.join(supported_norm_keys())}")
        for name_key in dict.fromkeys(site.name_key for site in sites):
            at_key = [site for site in sites if site.name_key == name_key]
            ours = [site.name for site in at_key]
            name = get_key(cfg, name_key)
            if name not in ours and any(site.reads_norm_keys(cfg) for site in at_key):
                expected = f"{ours[0]!r}" if len(ours) == 1 else f"one of {tuple(ours)}"
                raise ValueError(f'cfg.{key} = "MABN" needs cfg.{name_key} to be {expected}, '
                                 f"got {name!r}")


def stock_inference_config(cfg: CfgNode) -> CfgNode:
    """The config of the same architecture for stock Detectron2, without mabn_det.

    Every NORM "MABN" becomes the `inference_norm` of the modules that read it ("FrozenBN"; "BN"
    for MODEL.RETINANET.NORM, evaluated in eval mode) and every mabn_det name its stock
    counterpart (`RESUMABLE_SAMPLER` "TrainingSampler"); the keys that `add_mabn_config` added are
    removed. Weights converted by `mabn_det.layers.convert_to_inference_form` load into the model
    it builds.
    """
    stock = cfg.clone()
    stock.defrost()
    inference_norms = {key: site.inference_norm for site in _SITES.values()
                       for key in site.norm_keys}
    for key in mabn_norm_keys(stock):
        if key in inference_norms:
            set_key(stock, key, inference_norms[key])
    for name_key in {site.name_key for site in _SITES.values()}:
        name = get_key(stock, name_key)
        if name in _SITES:
            set_key(stock, name_key, _SITES[name].stock)
    if stock.DATALOADER.SAMPLER_TRAIN == RESUMABLE_SAMPLER:
        stock.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    del stock.MODEL["MABN"]
    del stock.SOLVER["GRAD_ACCUMULATION_STEPS"]
    del stock.SOLVER["CHECKPOINT_MAX_TO_KEEP"]
    del stock.SOLVER["PREEMPTION_SIGNALS"]
    return stock
