"""Tiny real models and small helpers for tests, demos and CPU benchmarks."""
from .configs import tiny_mimiq_cfg, tiny_runtime_cfg
from .models import (TINY_CONFIGS, UPSTREAM, build_model_from_cfg, build_tiny_model,
                     build_upstream_backbone,
                     load_upstream_config, randomize_parameters_, replace_sync_bn, strip_pretrained,
                     tiny_maskrcnn_swin_cfg, tiny_timm_swin, tiny_timm_vit,
                     tiny_upernet_swin_cfg, tiny_upernet_vit_cfg)

__all__ = ['TINY_CONFIGS', 'UPSTREAM', 'build_model_from_cfg', 'build_tiny_model',
           'build_upstream_backbone',
           'load_upstream_config', 'randomize_parameters_', 'replace_sync_bn', 'strip_pretrained',
           'tiny_maskrcnn_swin_cfg', 'tiny_timm_swin', 'tiny_timm_vit', 'tiny_upernet_swin_cfg',
           'tiny_mimiq_cfg', 'tiny_runtime_cfg', 'tiny_upernet_vit_cfg']
