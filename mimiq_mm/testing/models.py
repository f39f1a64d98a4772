"""Tiny but real OpenMMLab / timm models for tests, demos and CPU benchmarks.

Each ``tiny_*_cfg()`` starts from the upstream config shipped inside the mmdet / mmseg
package (``mmdet::...`` / ``mmseg::...``), keeps every component type, and only scales
widths/depths down. All pretrained URLs and ``init_cfg`` entries are removed, so nothing is
ever downloaded. SyncBN is replaced by BN so the models train on one CPU process.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from mmengine.config import Config

from mimiq_mm.utils.mm_builder import build_task_model, replace_sync_bn, strip_pretrained

#: Upstream configs the tiny models (and the shipped mimiq configs) derive from.
UPSTREAM = {
    'maskrcnn_swin': 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    'upernet_swin': 'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    'upernet_vit': 'mmseg::vit/vit_vit-b16_mln_upernet_8xb2-80k_ade20k-512x512.py',
}
SCOPE = {'maskrcnn_swin': 'mmdet', 'upernet_swin': 'mmseg', 'upernet_vit': 'mmseg'}


def load_upstream_config(name_or_path: str) -> Config:
    """Load an upstream config (``'mmdet::swin/...py'``) from the installed package."""
    from mmengine.hub import get_config
    return get_config(name_or_path, pretrained=False)


def _finish(cfg: Config) -> Config:
    strip_pretrained(cfg.model)
    replace_sync_bn(cfg.model)
    return cfg


def tiny_maskrcnn_swin_cfg(num_classes: int = 3, embed_dims: int = 32,
                           channels: int = 32) -> Config:
    """Mask R-CNN with a 4-stage Swin backbone (2 blocks a stage: W-MSA + SW-MSA)."""
    cfg = load_upstream_config(UPSTREAM['maskrcnn_swin'])
    m = cfg.model
    m.backbone.update(embed_dims=embed_dims, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 8],
                      window_size=7, drop_path_rate=0.0, convert_weights=False)
    m.neck.update(in_channels=[embed_dims * 2**i for i in range(4)], out_channels=channels)
    m.rpn_head.update(in_channels=channels, feat_channels=channels)
    m.roi_head.bbox_roi_extractor.update(out_channels=channels)
    m.roi_head.bbox_head.update(in_channels=channels, fc_out_channels=64,
                                num_classes=num_classes)
    m.roi_head.mask_roi_extractor.update(out_channels=channels)
    m.roi_head.mask_head.update(in_channels=channels, conv_out_channels=channels,
                                num_classes=num_classes)
    # fewer proposals/samples: CPU friendly, same code paths
    m.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    m.train_cfg.rcnn.sampler.update(num=64)
    m.test_cfg.rpn.update(nms_pre=200, max_per_img=100)
    return _finish(cfg)


def tiny_upernet_swin_cfg(num_classes: int = 4, embed_dims: int = 32,
                          channels: int = 32, crop_size=(64, 64)) -> Config:
    """UperNet (+ FCN auxiliary head) with a 4-stage Swin backbone."""
    cfg = load_upstream_config(UPSTREAM['upernet_swin'])
    m = cfg.model
    m.data_preprocessor.update(size=tuple(crop_size))
    m.backbone.update(embed_dims=embed_dims, depths=[2, 2, 2, 2], num_heads=[2, 2, 4, 8],
                      window_size=7, drop_path_rate=0.0)
    m.decode_head.update(in_channels=[embed_dims * 2**i for i in range(4)], channels=channels,
                         num_classes=num_classes)
    m.auxiliary_head.update(in_channels=embed_dims * 4, channels=channels // 2,
                            num_classes=num_classes)
    return _finish(cfg)


def tiny_upernet_vit_cfg(num_classes: int = 4, embed_dims: int = 64, num_layers: int = 4,
                         channels: int = 32, crop_size=(64, 64)) -> Config:
    """UperNet on mmseg's VisionTransformer (mmcv MultiheadAttention, packed in_proj)."""
    cfg = load_upstream_config(UPSTREAM['upernet_vit'])
    m = cfg.model
    m.data_preprocessor.update(size=tuple(crop_size))
    m.backbone.update(img_size=tuple(crop_size), embed_dims=embed_dims, num_layers=num_layers,
                      num_heads=4, out_indices=tuple(range(num_layers))[-4:],
                      drop_path_rate=0.0)
    m.neck.update(in_channels=[embed_dims] * 4, out_channels=embed_dims)
    m.decode_head.update(in_channels=[embed_dims] * 4, channels=channels,
                         num_classes=num_classes)
    m.auxiliary_head.update(in_channels=embed_dims, channels=channels // 2,
                            num_classes=num_classes)
    return _finish(cfg)


TINY_CONFIGS: Dict[str, Callable[..., Config]] = {
    'maskrcnn_swin': tiny_maskrcnn_swin_cfg,
    'upernet_swin': tiny_upernet_swin_cfg,
    'upernet_vit': tiny_upernet_vit_cfg,
}


def build_model_from_cfg(model_cfg: dict, scope: str):
    """Build and initialise an mmdet/mmseg model; sets ``scope`` as the default scope when
    none is set yet (mmdet/mmseg transforms and metrics look things up through it)."""
    from mmengine.registry import DefaultScope, init_default_scope
    if scope not in SCOPE.values():
        raise ValueError(f"scope must be 'mmdet' or 'mmseg', got {scope!r}")
    if DefaultScope.get_current_instance() is None:
        init_default_scope(scope)
    model = build_task_model(model_cfg, scope)
    model.init_weights()
    return model


def build_upstream_backbone(name: str, **overrides):
    """The backbone of the upstream config ``UPSTREAM[name]`` alone, at full size unless
    ``overrides`` change its settings (e.g. ``num_layers=2``): every ``init_cfg`` /
    ``pretrained`` removed, SyncBN -> BN, built in the config's scope and initialised with
    random weights (``init_weights``; nothing is downloaded).

    Returns ``(backbone, data_preprocessor config)``; the latter holds the mean / std (and
    channel conversion) the task model would normalise its inputs with.
    """
    if name not in UPSTREAM:
        raise ValueError(f'unknown upstream config {name!r}; valid: {sorted(UPSTREAM)}')
    cfg = _finish(load_upstream_config(UPSTREAM[name]))
    backbone_cfg = cfg.model.backbone
    backbone_cfg.update(overrides)
    backbone = build_task_model(backbone_cfg, SCOPE[name])
    backbone.init_weights()
    return backbone, cfg.model.data_preprocessor


def build_tiny_model(name: str, **kwargs):
    """``build_tiny_model('maskrcnn_swin' | 'upernet_swin' | 'upernet_vit')`` -> nn.Module."""
    if name not in TINY_CONFIGS:
        raise ValueError(f'unknown tiny model {name!r}; valid: {sorted(TINY_CONFIGS)}')
    cfg = TINY_CONFIGS[name](**kwargs)
    return build_model_from_cfg(cfg.model, SCOPE[name])


def tiny_timm_vit(img_size: int = 32, **kwargs):
    """timm's registered ``test_vit`` (dim 64, 2 heads), at a small image size."""
    import timm
    return timm.create_model('test_vit', pretrained=False, img_size=img_size, **kwargs)


def tiny_timm_swin(img_size: int = 32, **kwargs):
    """A two-stage timm Swin with window 4 (shifted windows in the second block)."""
    import timm
    params = dict(patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2),
                  num_classes=10)
    params.update(kwargs)
    return timm.create_model('swin_tiny_patch4_window7_224', pretrained=False,
                             img_size=img_size, **params)


def randomize_parameters_(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Non-trivial values for every parameter, in place (e.g. relative-position tables
    start at zero, which would hide a wrong bias index)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module
