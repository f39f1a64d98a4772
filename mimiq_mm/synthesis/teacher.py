"""The frozen float teacher as seen by synthesis: input normalisation and forward paths.

:class:`SynthesisTeacher` wraps an mmdet detector, an mmseg segmentor, a timm-style classifier
(``forward_features`` / ``forward_head``) or any backbone ``nn.Module`` and offers

- the normalised input space (mean/std of the teacher's data preprocessor) and its valid range;
- ``features(x)``: backbone forward (the part that holds the attention layers);
- ``task_loss(x, mode, generator)``: the optional ``L_task`` term (none / classifier / task).

:func:`build_teacher` builds one from the ``teacher=dict(...)`` block of a config.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import logging
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimiq_mm.utils.mm_builder import build_task_model, replace_sync_bn, strip_pretrained

__all__ = ['SynthesisTeacher', 'as_teacher', 'build_teacher', 'IMAGENET_MEAN', 'IMAGENET_STD']

logger = logging.getLogger(__name__)

#: ImageNet statistics in 0..255 pixel units (fallback when a model does not carry its own).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
PIXEL_MAX = 255.0
KINDS = ('mmdet', 'mmseg', 'classifier', 'backbone')


def _isinstance_of(obj, module_path: str, class_name: str) -> bool:
    try:
        cls = getattr(importlib.import_module(module_path), class_name)
    except (ImportError, AttributeError):
        return False
    return isinstance(obj, cls)


def _first(module):
    """First stage of a cascade (``nn.ModuleList``) or the module itself."""
    return module[0] if isinstance(module, (nn.ModuleList, list, tuple)) else module


def _infer_kind(model: nn.Module) -> str:
    if _isinstance_of(model, 'mmdet.models.detectors', 'BaseDetector'):
        return 'mmdet'
    if _isinstance_of(model, 'mmseg.models.segmentors', 'BaseSegmentor'):
        return 'mmseg'
    if callable(getattr(model, 'forward_features', None)) and callable(
            getattr(model, 'forward_head', None)):
        return 'classifier'
    return 'backbone'


def _mean_std_from_model(model: nn.Module, kind: str):
    """(mean, std, channel_order) in 0..255 units of the tensor the network sees."""
    pre = getattr(model, 'data_preprocessor', None)
    if kind in ('mmdet', 'mmseg') and pre is not None:
        if not getattr(pre, '_enable_normalize', False):
            raise ValueError(f'{type(model).__name__}.data_preprocessor does not normalise '
                             '(no mean/std): set data_preprocessor.mean/std in the model config')
        mean = [float(v) for v in pre.mean.flatten()]
        std = [float(v) for v in pre.std.flatten()]
        convert = bool(getattr(pre, '_channel_conversion', False)
                       or getattr(pre, 'channel_conversion', False))
        # files are loaded BGR by mmcv; with conversion the network sees RGB
        return mean, std, 'rgb' if convert else 'bgr'
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    if 'mean' in cfg and 'std' in cfg:
        return ([float(v) * PIXEL_MAX for v in cfg['mean']],
                [float(v) * PIXEL_MAX for v in cfg['std']], 'rgb')
    logger.warning('%s carries no mean/std; using ImageNet statistics', type(model).__name__)
    return list(IMAGENET_MEAN), list(IMAGENET_STD), 'rgb'


def _as_token_list(feats) -> List[Tensor]:
    """Backbone outputs -> list of (B, N, C) token tensors (NCHW maps are flattened)."""
    if isinstance(feats, Tensor):
        feats = [feats]
    tokens = []
    for f in feats:
        if not isinstance(f, Tensor):
            continue
        if f.dim() == 4:
            tokens.append(f.flatten(2).transpose(1, 2))
        elif f.dim() == 3:
            tokens.append(f)
    if not tokens:
        raise ValueError('backbone produced no (B, C, H, W) or (B, N, C) feature tensors')
    return tokens


def topk_sigmoid_confidence(logit_maps: Sequence[Tensor], topk: int) -> Tensor:
    """-log sigmoid of the top-k logits per image over all levels/anchors/classes."""
    flat = torch.cat([m.float().flatten(1) for m in logit_maps], dim=1)
    k = min(topk, flat.shape[1])
    top = flat.topk(k, dim=1).values
    return F.softplus(-top).mean()


def self_label_cross_entropy(logits: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """CE of ``logits`` (N, C, ...) against their own argmax (over the first ``num_classes``)."""
    logits = logits.float()
    considered = logits if num_classes is None else logits[:, :num_classes]
    target = considered.detach().argmax(dim=1)
    return F.cross_entropy(logits, target)


class SynthesisTeacher:
    """A frozen float model and the normalised input space it expects.

    Args:
        model: mmdet detector, mmseg segmentor, timm-style classifier or a backbone.
        mean, std: per-channel statistics in 0..255 units (default: from the model's
            ``data_preprocessor`` or ``pretrained_cfg``).
        channel_order: channel order of the tensor the network sees (``'rgb'``/``'bgr'``).
        classifier: optional module mapping backbone outputs to class logits (used by
            ``task_loss='classifier'`` for detectors/segmentors).
        description: free-form dict written to the manifest.
    """

    def __init__(self, model: nn.Module, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, channel_order: Optional[str] = None,
                 kind: Optional[str] = None, classifier: Optional[nn.Module] = None,
                 description: Optional[Mapping[str, Any]] = None):
        self.model = model
        self.kind = kind or _infer_kind(model)
        if self.kind not in KINDS:
            raise ValueError(f'teacher kind must be one of {KINDS}, got {self.kind!r}')
        m, s, order = _mean_std_from_model(model, self.kind)
        self.mean = [float(v) for v in (mean if mean is not None else m)]
        self.std = [float(v) for v in (std if std is not None else s)]
        self.channel_order = channel_order or order
        if self.channel_order not in ('rgb', 'bgr'):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f'mean/std must be 3 positive-std values, got {self.mean}/{self.std}')
        self.classifier = classifier
        self.description = dict(description or {})
        self.description.setdefault('class', type(model).__name__)
        self.description.setdefault('kind', self.kind)

    def fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the network (and classifier) that makes images."""
        return weights_fingerprint(self.model, self.classifier)

    # ------------------------------------------------------------------ input space
    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        for b in self.model.buffers():
            return b.device
        return torch.device('cpu')

    def stats(self, device=None) -> Tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return mean, std

    def pixel_range(self, device=None) -> Tuple[Tensor, Tensor]:
        """(low, high) of the normalised images of 0..255 pixels, each (1, 3, 1, 1)."""
        mean, std = self.stats(device)
        return (0.0 - mean) / std, (PIXEL_MAX - mean) / std

    def to_pixels(self, x: Tensor) -> Tensor:
        """Normalised (B, 3, H, W) -> uint8 RGB (B, H, W, 3) on CPU."""
        mean, std = self.stats(x.device)
        pix = (x.detach().float() * std + mean).clamp(0, PIXEL_MAX).round().to(torch.uint8)
        if self.channel_order == 'bgr':
            pix = pix.flip(1)
        return pix.permute(0, 2, 3, 1).cpu()

    def from_pixels(self, rgb: Tensor, device=None) -> Tensor:
        """uint8 RGB (B, H, W, 3) -> normalised float (B, 3, H, W)."""
        x = rgb.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2)
        if self.channel_order == 'bgr':
            x = x.flip(1)
        mean, std = self.stats(device)
        return (x - mean) / std

    # ------------------------------------------------------------------ forward paths
    @property
    def attention_scope(self) -> nn.Module:
        """The module whose attention layers L_sim uses (the backbone when there is one)."""
        if self.kind in ('mmdet', 'mmseg'):
            return self.model.backbone
        return self.model

    def features(self, x: Tensor):
        """Backbone forward (attention layers run here)."""
        if self.kind in ('mmdet', 'mmseg'):
            return self.model.backbone(x)
        if self.kind == 'classifier':
            return self.model.forward_features(x)
        return self.model(x)

    def feature_tokens(self, x: Tensor) -> List[Tensor]:
        """Multi-level patch features as (B, N, C) tokens (PSAQ baseline)."""
        if self.kind == 'classifier' and callable(getattr(self.model, 'forward_intermediates', None)):
            feats = self.model.forward_intermediates(x, intermediates_only=True)
        else:
            feats = self.features(x)
            if self.kind == 'classifier' and isinstance(feats, Tensor) and feats.dim() == 3:
                feats = feats[:, int(getattr(self.model, 'num_prefix_tokens', 0)):]
            elif self.kind == 'classifier' and isinstance(feats, Tensor) and feats.dim() == 4:
                feats = feats.permute(0, 3, 1, 2)   # timm NHWC -> NCHW
        return _as_token_list(feats)

    def task_loss(self, x: Tensor, mode: str, generator: torch.Generator,
                  topk: int = 100) -> Tensor:
        """``L_task`` for ``mode`` in {'classifier', 'task'} (the caller handles 'none').

        - ``'classifier'``: cross-entropy to random labels (drawn from ``generator``) through
          the classifier's head (timm model, or ``classifier=`` applied to backbone outputs);
        - ``'task'`` (label-free, through the model's own heads): segmentors: CE of the decode
          head on its own argmax; two-stage detectors: RPN objectness of the top-k anchors plus
          RoI-head class confidence on its own top-k proposals; one-stage detectors: top-k
          class confidence; classifiers: CE to their own argmax.
        """
        if mode == 'classifier':
            return self._classifier_loss(x, generator)
        if mode != 'task':
            raise ValueError(f"task_loss mode must be 'classifier' or 'task', got {mode!r}")
        if self.kind == 'mmseg':
            return self._segmentor_task_loss(x)
        if self.kind == 'mmdet':
            return self._detector_task_loss(x, topk)
        if self.kind == 'classifier':
            return self_label_cross_entropy(self.model(x))
        raise ValueError(f"task_loss='task' needs an mmdet detector, an mmseg segmentor or a "
                         f"classifier; {type(self.model).__name__} is a plain backbone. Use "
                         "synthesis.task_loss='none' (or pass classifier=... and 'classifier')")

    def _classifier_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.classifier is not None:
            logits = self.classifier(self.features(x))
        elif self.kind == 'classifier':
            logits = self.model(x)
        else:
            raise ValueError(
                f"task_loss='classifier' needs a classification head: {type(self.model).__name__} "
                "has none. Pass synthesize(..., classifier=<module mapping backbone outputs to "
                "logits>) or use task_loss='task' / 'none'")
        labels = torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=generator,
                               device=generator.device).to(logits.device)
        return F.cross_entropy(logits.float(), labels)

    def _segmentor_task_loss(self, x: Tensor) -> Tensor:
        head = self.model.decode_head
        if isinstance(head, nn.ModuleList):
            raise ValueError('task_loss=\'task\' supports segmentors with one decode head; '
                             f'{type(self.model).__name__} has a cascade. Use task_loss=\'none\'')
        logits = head(self.model.extract_feat(x))
        return self_label_cross_entropy(logits)

    def _detector_task_loss(self, x: Tensor, topk: int) -> Tensor:
        model = self.model
        feats = model.extract_feat(x)
        if getattr(model, 'with_rpn', False):
            cls_scores, bbox_preds = model.rpn_head(feats)[:2]
            loss = topk_sigmoid_confidence(cls_scores, topk)
            roi_head = getattr(model, 'roi_head', None)
            if roi_head is not None and getattr(roi_head, 'with_bbox', False):
                loss = loss + self._roi_confidence(feats, cls_scores, bbox_preds, x, topk)
            return loss
        head = getattr(model, 'bbox_head', None)
        if head is not None:
            outs = head(feats)
            return topk_sigmoid_confidence(outs[0], topk)
        raise ValueError(f"task_loss='task' does not know the heads of {type(model).__name__} "
                         "(no rpn_head / bbox_head). Use synthesis.task_loss='none'")

    def _roi_confidence(self, feats, cls_scores, bbox_preds, x: Tensor, topk: int) -> Tensor:
        from mmdet.structures.bbox import bbox2roi
        model = self.model
        height, width = x.shape[-2:]
        metas = [dict(img_shape=(height, width), ori_shape=(height, width),
                      pad_shape=(height, width), scale_factor=(1.0, 1.0))
                 for _ in range(x.shape[0])]
        rpn_cfg = copy.deepcopy(model.test_cfg.rpn) if model.test_cfg is not None else None
        with torch.no_grad():
            proposals = model.rpn_head.predict_by_feat(
                [c.detach().float() for c in cls_scores], [b.detach().float() for b in bbox_preds],
                batch_img_metas=metas, cfg=rpn_cfg, rescale=False)
        boxes = [p.bboxes[:topk] for p in proposals]
        if sum(len(b) for b in boxes) == 0:
            return feats[0].new_zeros(())
        rois = bbox2roi(boxes)
        roi_head = model.roi_head
        extractor = _first(roi_head.bbox_roi_extractor)
        bbox_head = _first(roi_head.bbox_head)
        roi_feats = extractor(feats[:extractor.num_inputs], rois.to(feats[0].dtype))
        if getattr(roi_head, 'with_shared_head', False):
            roi_feats = roi_head.shared_head(roi_feats)
        cls_score = bbox_head(roi_feats)[0]
        num_classes = bbox_head.num_classes
        if cls_score.shape[1] == num_classes + 1:      # softmax head, background last
            return self_label_cross_entropy(cls_score, num_classes)
        return topk_sigmoid_confidence([cls_score], topk)

    # ------------------------------------------------------------------ freezing
    @contextlib.contextmanager
    def frozen(self):
        """Eval mode and no parameter gradients inside; previous state restored on exit."""
        modules = [self.model] + ([self.classifier] if self.classifier is not None else [])
        training = [(m, m.training) for mod in modules for m in mod.modules()]
        flags = [(p, p.requires_grad) for mod in modules for p in mod.parameters()]
        for mod in modules:
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)
        try:
            yield self
        finally:
            for m, was_training in training:
                m.training = was_training
            for p, flag in flags:
                p.requires_grad_(flag)

    def to(self, device) -> 'SynthesisTeacher':
        self.model.to(device)
        if self.classifier is not None:
            self.classifier.to(device)
        return self


def as_teacher(teacher, **kwargs) -> SynthesisTeacher:
    """``SynthesisTeacher`` from a teacher object or an ``nn.Module``."""
    if isinstance(teacher, SynthesisTeacher):
        return teacher
    if isinstance(teacher, nn.Module):
        return SynthesisTeacher(teacher, **kwargs)
    raise TypeError(f'teacher must be an nn.Module or SynthesisTeacher, got {type(teacher).__name__}')


# ---------------------------------------------------------------------- building from config
def _build_mm_model(model_cfg: dict, scope: str) -> nn.Module:
    if scope not in ('mmdet', 'mmseg'):
        raise ValueError(f"teacher.scope must be 'mmdet' or 'mmseg', got {scope!r}")
    model = build_task_model(model_cfg, scope)
    with _quiet_mmengine_logger():
        model.init_weights()
    return model


@contextlib.contextmanager
def _quiet_mmengine_logger():
    """init_weights logs one INFO paragraph per parameter; keep warnings only."""
    from mmengine.logging import MMLogger
    log = MMLogger.get_current_instance()
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def build_teacher(cfg) -> SynthesisTeacher:
    """Build the teacher from a full config (``cfg.teacher`` plus, by default, ``cfg.model``).

    ``teacher = dict(model=..., scope='mmdet'|'mmseg', checkpoint=PATH|None, mean=, std=)``.
    ``teacher.model`` may be an mmdet/mmseg model config (default: the config's top-level
    ``model``, e.g. inherited from an upstream config) or ``dict(type='timm', name=...,
    **kwargs)``. ``checkpoint=None`` keeps random weights (demos and tests only).
    """
    from mmengine.config import ConfigDict
    teacher_cfg = copy.deepcopy(dict(cfg.get('teacher', None) or {}))
    model_cfg = teacher_cfg.pop('model', None)
    if model_cfg is None:
        model_cfg = cfg.get('model', None)
    if model_cfg is None:
        raise ValueError('no teacher model in the config: set teacher.model=<model config> '
                         "or dict(type='timm', name=...), or inherit a top-level `model`")
    model_cfg = copy.deepcopy(ConfigDict(model_cfg))
    checkpoint = teacher_cfg.pop('checkpoint', None)
    if model_cfg.get('type') == 'timm':
        import timm
        params = dict(model_cfg)
        params.pop('type')
        name = params.pop('name')
        model = timm.create_model(name, pretrained=False, **params)
        description = dict(source='timm', name=name)
    else:
        scope = teacher_cfg.pop('scope', None) or cfg.get('default_scope', None)
        if scope is None:
            raise ValueError("teacher.scope is not set and the config has no default_scope: "
                             "add teacher=dict(scope='mmdet') (or 'mmseg')")
        strip_pretrained(model_cfg)
        if teacher_cfg.pop('sync_bn_to_bn', True):
            replace_sync_bn(model_cfg)
        model = _build_mm_model(model_cfg, scope)
        description = dict(source=scope, type=model_cfg.get('type'))
    if checkpoint is None:
        logger.warning('teacher.checkpoint is None: synthesizing from a RANDOMLY initialised '
                       'teacher (fine for tests/demos, meaningless otherwise)')
    else:
        load_teacher_checkpoint(model, checkpoint)
    description['checkpoint'] = checkpoint
    return SynthesisTeacher(model, mean=teacher_cfg.pop('mean', None),
                            std=teacher_cfg.pop('std', None),
                            channel_order=teacher_cfg.pop('channel_order', None),
                            description=description)


def weights_fingerprint(*modules: Optional[nn.Module]) -> str:
    """16 hex digits of sha256 over the tensors of the modules' state dicts, by value: the
    same for the same weights whatever the key names and order (the attention adapters
    rename a ViT's keys, not its values), different as soon as one value differs. Recorded
    in a synthetic set's manifest, so that a set is never reused with another teacher."""
    digests = []
    for module in modules:
        if module is None:
            continue
        for tensor in module.state_dict().values():
            if not torch.is_tensor(tensor):
                continue
            flat = tensor.detach().to('cpu').contiguous().reshape(-1)
            digest = hashlib.sha256(f'{flat.dtype}{tuple(tensor.shape)}'.encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
            digests.append(digest.hexdigest())
    return hashlib.sha256(''.join(sorted(digests)).encode()).hexdigest()[:16]


def load_teacher_checkpoint(model: nn.Module, checkpoint: str) -> None:
    """Load ``checkpoint`` into ``model`` on CPU, strictly (as the fine-tuning run loads its
    teacher): a missing file raises FileNotFoundError, an unreadable one or one whose keys do
    not match the model an error that names it."""
    from mimiq_mm.utils.checkpoint import refuse_remote
    refuse_remote(str(checkpoint), 'teacher.checkpoint')  # the project's one URL guard
    path = os.path.expanduser(str(checkpoint))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'teacher checkpoint not found: {path!r}. Set the config key teacher.checkpoint to '
            'an existing file (e.g. --cfg-options teacher.checkpoint=/path/to/teacher.pth), '
            'or teacher.checkpoint=None to use random weights for a smoke test.')
    from mimiq_mm.utils.checkpoint import load_teacher_weights
    load_teacher_weights(model, path, cfg_key='teacher.checkpoint')
