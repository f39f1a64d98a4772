"""A real pretrained backbone for mmdet and mmseg: DINOv2 ViT-S/14 + a simple pyramid.

``DINOv2Pyramid`` wraps a stock timm ``vit_small_patch14_dinov2`` (its modules, so the timm
attention adapter, the recorder and ``quantize_`` see ordinary timm blocks) and turns the
outputs of four of its blocks into a stride-4/8/16/32 pyramid, the multi-scale features a
Mask R-CNN FPN or an UperNet head expects (ViTDet's "simple feature pyramid" idea with
mmseg's ``out_indices`` convention):

* block outputs ``out_indices`` (default 2, 5, 8, 11) go through the ViT's final LayerNorm
  (DINOv2's ``get_intermediate_layers(norm=True)``), lose the CLS token and become
  ``(B, 384, H/14, W/14)`` maps;
* each map is resampled bilinearly by exactly ``14 / stride`` (pixel centres stay aligned)
  and cropped to ``ceil(H / stride)``.

Position table: the pretrained graph keeps it at 37x37 and resizes it to the input's patch
grid with plain bicubic interpolation (``F.interpolate(..., 'bicubic', align_corners=False)``,
no antialiasing); :func:`resample_pos_embed` reproduces that exactly (timm's own dynamic
resize antialiases, which changes every token when downsampling).

Image sizes that are not a multiple of 14 are padded with zeros on the bottom/right to the
next multiple (``pad_to_patch=True``, the default) and the pyramid is cropped back to the
unpadded size; with ``pad_to_patch=False`` such a size is a ``ValueError``.

``pretrained='dinov2_vits14_imgfocus'`` makes ``init_weights`` load the weights that
``make setup`` converted (:mod:`mimiq_mm.models.pretrained`); ``frozen=True`` keeps the ViT
out of the optimizer (``requires_grad=False``), so teachers trained with it keep the
pretrained model's statistics.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor, nn

from .pretrained import load_pretrained_state

#: Checkpoint meta key of a teacher saved without its frozen pretrained backbone (see
#: :func:`strip_frozen_pretrained` and ``utils.checkpoint.load_teacher_weights``).
FROZEN_PRETRAINED_META = 'frozen_pretrained'


def resample_pos_embed(pos_embed: Tensor, grid: int, size: Sequence[int],
                       num_prefix_tokens: int = 1) -> Tensor:
    """(1, P + grid², C) table -> (1, P + h*w, C) for a ``size = (h, w)`` patch grid, with
    plain bicubic interpolation (no antialiasing), the prefix rows unchanged."""
    h, w = int(size[0]), int(size[1])
    if (h, w) == (grid, grid):
        return pos_embed
    prefix, rows = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = rows.shape[-1]
    table = rows.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(h, w), mode='bicubic', align_corners=False)
    rows = table.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, rows], dim=1)


class DINOv2Pyramid(BaseModule):
    """DINOv2 ViT (timm) + simple feature pyramid; see the module docstring.

    Args:
        arch: timm architecture (built without downloading anything).
        pretrained: name of converted weights (:mod:`mimiq_mm.models.pretrained`) loaded by
            ``init_weights``; None = leave the weights to a checkpoint.
        out_indices: blocks whose outputs form the pyramid (one per stride).
        out_strides: stride of each output map.
        frozen: the ViT's parameters get ``requires_grad=False``.
        pad_to_patch: pad inputs to a multiple of the patch size (else a ValueError).
    """

    def __init__(self,
                 arch: str = 'vit_small_patch14_dinov2',
                 pretrained: Optional[str] = 'dinov2_vits14_imgfocus',
                 out_indices: Sequence[int] = (2, 5, 8, 11),
                 out_strides: Sequence[int] = (4, 8, 16, 32),
                 frozen: bool = True,
                 pad_to_patch: bool = True,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        import timm
        if len(out_indices) != len(out_strides):
            raise ValueError(f'out_indices {tuple(out_indices)} and out_strides '
                             f'{tuple(out_strides)} must have the same length')
        self.vit = timm.create_model(arch, pretrained=False, dynamic_img_size=True,
                                     num_classes=0)
        depth = len(self.vit.blocks)
        bad = [i for i in out_indices if not 0 <= int(i) < depth]
        if bad:
            raise ValueError(f'out_indices {bad} outside the {depth} blocks of {arch}')
        self.arch = arch
        self.pretrained = pretrained
        self.out_indices = tuple(int(i) for i in out_indices)
        self.out_strides = tuple(int(s) for s in out_strides)
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.grid = int(self.vit.patch_embed.grid_size[0])
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        self.embed_dim = int(self.vit.embed_dim)
        self.frozen = bool(frozen)
        self.pad_to_patch = bool(pad_to_patch)
        if self.frozen:
            for p in self.vit.parameters():
                p.requires_grad_(False)

    @property
    def out_channels(self):
        return [self.embed_dim] * len(self.out_indices)

    def init_weights(self):
        if self.pretrained is None:
            return super().init_weights()
        state = load_pretrained_state(self.pretrained)
        self.vit.load_state_dict(state, strict=True)

    def _pad(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        p = self.patch_size
        ph, pw = (-H) % p, (-W) % p
        if ph or pw:
            if not self.pad_to_patch:
                raise ValueError(f'input size {H}x{W} is not a multiple of the patch size '
                                 f'{p}; resize or pad it (or set pad_to_patch=True)')
            x = F.pad(x, (0, pw, 0, ph))
        return x

    def tokens(self, x: Tensor) -> Tensor:
        """Patch tokens with the CLS token and the position table added: (B, 1 + N, C)."""
        vit = self.vit
        t = vit.patch_embed(x)  # (B, h, w, C): dynamic_img_size makes it NHWC
        B, h, w, C = t.shape
        t = t.reshape(B, h * w, C)
        t = torch.cat([vit.cls_token.expand(B, -1, -1).to(t.dtype), t], dim=1)
        pos = resample_pos_embed(vit.pos_embed, self.grid, (h, w), self.num_prefix_tokens)
        t = t + pos.to(t.dtype)
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(t)))

    def forward_blocks(self, x: Tensor, upto: Optional[int] = None):
        """(normed final output (B, 1 + N, C), {index: normed block output}, (h, w))."""
        x = self._pad(x)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        t = self.tokens(x)
        wanted = set(self.out_indices)
        outs = {}
        last = len(self.vit.blocks) - 1 if upto is None else upto
        for i, blk in enumerate(self.vit.blocks):
            t = blk(t)
            if i in wanted:
                outs[i] = self.vit.norm(t)
            if i == last:
                break
        return self.vit.norm(t), outs, (h, w)

    def forward(self, x: Tensor):
        H, W = x.shape[-2:]
        _, outs, (h, w) = self.forward_blocks(x, upto=max(self.out_indices))
        feats = []
        for idx, stride in zip(self.out_indices, self.out_strides):
            t = outs[idx][:, self.num_prefix_tokens:]
            fmap = t.transpose(1, 2).reshape(t.shape[0], self.embed_dim, h, w)
            fmap = F.interpolate(fmap, scale_factor=self.patch_size / stride, mode='bilinear',
                                 align_corners=False, recompute_scale_factor=False)
            feats.append(fmap[..., :math.ceil(H / stride), :math.ceil(W / stride)].contiguous())
        return tuple(feats)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self


def strip_frozen_pretrained(state: dict, prefixes: dict):
    """(state without the frozen pretrained weights, meta entry recording them).

    ``prefixes`` maps a state-dict prefix to pretrained weights (e.g.
    ``{'backbone.vit.': 'dinov2_vits14_imgfocus'}``; the ``vit`` of a frozen
    ``DINOv2Pyramid`` at ``backbone``).
    A teacher trained with a frozen backbone ships only what it learnt; the teacher loader
    (``utils.checkpoint.load_teacher_weights``) puts the converted weights back before its
    strict load. Weights that differ from the pretrained ones (a backbone that was not
    frozen) are an error."""
    meta = []
    kept = dict(state)
    for prefix, name in prefixes.items():
        ref = load_pretrained_state(name)
        for k, v in ref.items():
            key = prefix + k
            if key not in kept:
                raise ValueError(f'{key} is not in the checkpoint: {prefix!r} does not hold '
                                 f'the {name!r} backbone')
            if not torch.equal(kept[key].cpu(), v):
                raise ValueError(f'{key} differs from the pretrained {name!r} weights: the '
                                 'backbone was not frozen; ship the whole checkpoint')
            del kept[key]
        meta.append(dict(prefix=prefix, name=name))
    return kept, meta


def restore_frozen_pretrained(state: dict, meta) -> dict:
    """Inverse of :func:`strip_frozen_pretrained` (``meta`` from the checkpoint)."""
    state = dict(state)
    for entry in meta or ():
        ref = load_pretrained_state(entry['name'])
        for k, v in ref.items():
            key = entry['prefix'] + k
            if key in state:
                raise ValueError(f'{key} is both in the checkpoint and marked as frozen '
                                 'pretrained')
            state[key] = v
    return state


def _register():
    for scope in ('mmdet', 'mmseg'):
        try:
            registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
        except ImportError:  # pragma: no cover - both are requirements
            continue
        if 'DINOv2Pyramid' not in registry.module_dict:
            registry.register_module(module=DINOv2Pyramid)


_register()
