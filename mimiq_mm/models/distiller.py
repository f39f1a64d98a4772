"""MimiQDistiller: frozen float teacher + quantized student, trained on synthetic images.

    L = kd_weight * task KD + gamma * L_HSAD                  (MIMIQ.md §3)

The teacher is an ordinary mmdet / mmseg model built from its config and loaded from
``teacher_checkpoint``; the student is a deep copy of it passed through
:func:`mimiq_mm.quant.quantize_`. The teacher is deliberately kept OUT of the module tree
(it is not in ``parameters()`` nor in ``state_dict()``): the optimizer, DDP and the
checkpoints only ever see the student, and resuming rebuilds the teacher from its file.

Evaluation runs the student through the wrapped model's own ``predict``, so mmdet's
``CocoMetric`` and mmseg's ``IoUMetric`` work unchanged. With ``eval_teacher=True`` the
teacher is run too and its results are stored as ``teacher_pred_instances`` /
``teacher_pred_sem_seg`` ... in each data sample; :class:`mimiq_mm.engine.TeacherMetric`
evaluates them with any metric under its own prefix.
"""
import copy
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModel
from torch import Tensor, nn

from mimiq_mm.losses.hsad import HSAD_KINDS, hsad_loss
from mimiq_mm.losses.task_kd import (feature_kd_loss, kl_div_with_temperature,
                                     roi_bbox_kd_loss, roi_mask_kd_loss, rpn_kd_loss)
from mimiq_mm.registry import MODELS
from mimiq_mm.utils.checkpoint import load_teacher_weights
from mimiq_mm.utils.finite import check_finite_losses, check_loss_weights
from mimiq_mm.utils.mm_builder import build_task_model

from .generic import check_train_scope, trainable_parameters

#: Default weights of the task-KD terms (each multiplied by ``kd_weight``).
DEFAULT_KD_WEIGHTS = dict(
    feat=1.0,  # backbone/neck features
    rpn_cls=1.0, rpn_reg=1.0,  # RPN objectness / anchor deltas
    roi_cls=1.0, roi_reg=1.0, roi_mask=1.0,  # RoI head on the teacher's proposals
    seg=1.0, seg_aux=0.4)  # decode head / auxiliary head logits
FEAT_SOURCES = ('neck', 'backbone', 'both', 'none')
PRED_KEYS = ('pred_instances', 'pred_sem_seg', 'seg_logits', 'pred_panoptic_seg')
TEACHER_PREFIX = 'teacher_'


@MODELS.register_module()
class MimiQDistiller(BaseModel):
    """Data-free quantized fine-tuning of an mmdet / mmseg model (MimiQ §3).

    Args:
        teacher: config of the float model (e.g. the ``model`` of an upstream mmdet/mmseg
            config).
        teacher_checkpoint: float checkpoint of that model (required unless
            ``load_teacher=False``).
        quant_cfg: fields of :class:`mimiq_mm.quant.QuantConfig` (``dict(weight=dict(bits=4),
            act=dict(bits=4), ...)``).
        gamma: weight of L_HSAD (published 10).
        hsad_kind: 'ssim' (contrast-structure), 'mse' or 'l1'.
        kd_weight: global weight of the task-KD terms.
        kd_weights: per-term weights, see ``DEFAULT_KD_WEIGHTS``; a term with weight 0 is
            not computed.
        temperature: temperature of the KL / sigmoid KD terms.
        feat_source: which features to distil: 'neck', 'backbone', 'both' or 'none'.
        feat_kind: 'norm_mse', 'mse' or 'l1'.
        reg_kind: distance for box deltas ('smooth_l1', 'mse', 'l1').
        num_mask_rois: per image, the teacher's highest-scoring proposals used for mask KD.
        max_kd_rois: per image, at most this many of the teacher's proposals (highest RPN
            score first) for the RoI KD; None = all that ``train_cfg.rpn_proposal`` keeps.
        eval_teacher: also run the teacher in ``predict`` (results as ``teacher_*``).
        train_scope: which student parameters fine-tuning updates. 'quantized' (default):
            only those inside the quantization scope (``quant_cfg.scope``: the backbone's
            weights, LayerNorms and learnt steps); the float parts outside it (neck, heads)
            stay equal to the teacher's, so the synthetic images, which hold no objects,
            cannot pull them away from what they learnt on real data. 'all': every
            parameter of the student. 'steps': only the learnt quantizer steps (LSQ
            ``step`` parameters) inside the quantization scope; every float weight stays the
            teacher's. 'layers': the quantized layers' own parameters (Linear / Conv
            weights and biases, the steps of their quantizers and of the attention
            matmuls); LayerNorms, position tables, tokens and layer scales stay the
            teacher's. 'weights': like 'quantized' but without the learnt quantizer steps
            (the clipping ratios stay the calibrated ones).
        load_teacher: load ``teacher_checkpoint`` (False: test-time, when the student comes
            from a MimiQ checkpoint and the teacher is not evaluated).
        teacher_scope: registry scope of the teacher ('mmdet' / 'mmseg'); inferred if None.
    """

    def __init__(self,
                 teacher: dict,
                 teacher_checkpoint: Optional[str] = None,
                 quant_cfg: Optional[dict] = None,
                 gamma: float = 10.0,
                 hsad_kind: str = 'ssim',
                 kd_weight: float = 1.0,
                 kd_weights: Optional[dict] = None,
                 temperature: float = 1.0,
                 feat_source: str = 'neck',
                 feat_kind: str = 'norm_mse',
                 reg_kind: str = 'smooth_l1',
                 num_mask_rois: int = 32,
                 max_kd_rois: Optional[int] = None,
                 eval_teacher: bool = False,
                 student_train_mode: bool = False,
                 train_scope: str = 'quantized',
                 load_teacher: bool = True,
                 teacher_scope: Optional[str] = None,
                 data_preprocessor: Optional[Union[dict, nn.Module]] = None,
                 init_cfg: Optional[dict] = None):
        check_loss_weights(gamma=gamma, kd_weight=kd_weight, temperature=temperature,
                           kd_weights=dict(kd_weights or {}))
        if hsad_kind not in HSAD_KINDS:
            raise ValueError(f'hsad_kind={hsad_kind!r} is not valid; use one of {HSAD_KINDS}')
        if feat_source not in FEAT_SOURCES:
            raise ValueError(f'feat_source={feat_source!r} is not valid; use one of '
                             f'{FEAT_SOURCES}')
        unknown = sorted(set(kd_weights or {}) - set(DEFAULT_KD_WEIGHTS))
        if unknown:
            raise ValueError(f'unknown kd_weights {unknown}; valid: {sorted(DEFAULT_KD_WEIGHTS)}')
        check_train_scope(train_scope)
        if not isinstance(teacher, dict) or 'type' not in teacher:
            raise ValueError('teacher must be a model config dict with a "type" '
                             '(e.g. teacher=_base_.model)')
        teacher_model = build_task_model(teacher, teacher_scope)
        if load_teacher:
            load_teacher_weights(teacher_model, teacher_checkpoint)
        if data_preprocessor is None:
            data_preprocessor = copy.deepcopy(getattr(teacher_model, 'data_preprocessor', None))
            # Synthetic training images carry no ground truth: nothing to pad / augment.
            for attr in ('pad_mask', 'pad_seg'):
                if getattr(data_preprocessor, attr, False):
                    setattr(data_preprocessor, attr, False)
            if getattr(data_preprocessor, 'batch_augments', None) is not None:
                data_preprocessor.batch_augments = None
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)

        teacher_model.eval()
        for p in teacher_model.parameters():
            p.requires_grad_(False)
        # Outside the module tree on purpose (see the module docstring).
        object.__setattr__(self, 'teacher', teacher_model)
        self.teacher_checkpoint = teacher_checkpoint

        from mimiq_mm.quant import QuantConfig, get_scope, quantize_
        self.quant_config = QuantConfig.from_dict(
            dict(quant_cfg) if quant_cfg is not None else None)
        student = copy.deepcopy(teacher_model)
        quantize_(student, self.quant_config)
        trained = trainable_parameters(student, self.quant_config.scope, train_scope)
        for p in student.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        self.train_scope = train_scope
        # The teacher's attention must expose the same per-head records as the student's
        # (quantize_ adapted the attention modules of the same scope in the student).
        from mimiq_mm.attention import adapt_attention_
        adapt_attention_(get_scope(self.teacher, self.quant_config.scope)[0])
        self.student = student

        self.gamma = float(gamma)
        self.hsad_kind = hsad_kind
        self.kd_weight = float(kd_weight)
        self.kd_weights = {**DEFAULT_KD_WEIGHTS, **(kd_weights or {})}
        self.temperature = float(temperature)
        self.feat_source = feat_source
        self.feat_kind = feat_kind
        self.reg_kind = reg_kind
        self.num_mask_rois = int(num_mask_rois)
        if max_kd_rois is not None and int(max_kd_rois) < 1:
            raise ValueError(f'max_kd_rois must be None or >= 1, got {max_kd_rois!r}')
        self.max_kd_rois = None if max_kd_rois is None else int(max_kd_rois)
        self.eval_teacher = eval_teacher
        self.student_train_mode = bool(student_train_mode)
        self.train(self.training)

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)  # device / dtype moves reach the teacher
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if not getattr(self, 'student_train_mode', True):
            self.student.eval()
        return self

    def init_weights(self):
        """No-op: the teacher comes from ``teacher_checkpoint`` and the student from it
        (an upstream ``init_cfg`` would otherwise overwrite them, or try to download)."""

    @property
    def task(self) -> str:
        """'two_stage' (Faster/Mask/Cascade R-CNN), 'detector' (other mmdet detectors),
        'segmentor' (mmseg EncoderDecoder-like)."""
        if hasattr(self.student, 'rpn_head') and hasattr(self.student, 'roi_head'):
            return 'two_stage'
        if hasattr(self.student, 'decode_head'):
            return 'segmentor'
        return 'detector'

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: Tensor, data_samples=None, mode: str = 'tensor'):
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':
            return self.predict(inputs, data_samples)
        if mode == 'tensor':
            return self.student(inputs, data_samples, mode='tensor')
        raise RuntimeError(f'Invalid mode "{mode}"; use "loss", "predict" or "tensor".')

    def predict(self, inputs: Tensor, data_samples=None):
        """Student predictions via the wrapped model's predict (metrics work unchanged);
        with ``eval_teacher`` the teacher's are added as ``teacher_<key>``."""
        teacher_out = None
        if self.eval_teacher:
            with torch.no_grad():
                teacher_out = self.teacher(inputs, copy.deepcopy(data_samples),
                                           mode='predict')
        results = self.student(inputs, data_samples, mode='predict')
        if teacher_out is not None:
            for res, t_res in zip(results, teacher_out):
                for key in PRED_KEYS:
                    if key in t_res:
                        res.set_field(t_res.get(key), TEACHER_PREFIX + key)
        return results

    @torch.no_grad()
    def predict_teacher(self, inputs: Tensor, data_samples=None):
        return self.teacher(inputs, data_samples, mode='predict')

    # ------------------------------------------------------------------ features
    def _features(self, model: nn.Module, inputs: Tensor) -> Tuple[Sequence, Sequence]:
        """(backbone outputs, neck outputs) — the two halves of ``extract_feat``."""
        feats = model.backbone(inputs)
        neck = model.neck(feats) if getattr(model, 'with_neck', False) else feats
        return feats, neck

    def _record_features(self, inputs: Tensor):
        """((backbone, neck, attention records) of the teacher, the same of the student)."""
        from .generic import record_pair
        (t_feats, t_recs), (s_feats, s_recs) = record_pair(
            self.teacher, self.student, lambda m: self._features(m, inputs),
            with_attention=self.gamma > 0)
        return (*t_feats, t_recs), (*s_feats, s_recs)

    def _w(self, key: str) -> float:
        return self.kd_weight * float(self.kd_weights[key])

    # ------------------------------------------------------------------ loss
    def parse_losses(self, losses):
        """mmengine's, after a NaN / inf check of every term (called by ``train_step``
        with and without DDP, before the backward pass)."""
        check_finite_losses(losses)
        return super().parse_losses(losses)

    def loss(self, inputs: Tensor, data_samples=None) -> Dict[str, Tensor]:
        """MimiQ fine-tuning loss on (label-free) synthetic images."""
        (t_bb, t_neck, t_recs), (s_bb, s_neck, s_recs) = self._record_features(inputs)
        losses: Dict[str, Tensor] = {}
        if self.gamma > 0:
            losses['loss_hsad'] = self.gamma * hsad_loss(t_recs, s_recs, kind=self.hsad_kind)
        if self.feat_source != 'none' and self._w('feat') > 0:
            pairs = []
            if self.feat_source in ('backbone', 'both'):
                pairs.append((t_bb, s_bb))
            if self.feat_source in ('neck', 'both'):
                pairs.append((t_neck, s_neck))
            losses['loss_kd_feat'] = self._w('feat') * torch.stack(
                [feature_kd_loss(t, s, kind=self.feat_kind) for t, s in pairs]).mean()
        task = self.task
        if task == 'two_stage':
            losses.update(self._two_stage_kd(t_neck, s_neck, data_samples))
        elif task == 'segmentor':
            losses.update(self._segmentor_kd(t_neck, s_neck))
        return losses

    # --- segmentation
    def _segmentor_kd(self, t_feats, s_feats) -> Dict[str, Tensor]:
        losses = {}
        T = self.temperature
        if self._w('seg') > 0:
            with torch.no_grad():
                t_logits = self.teacher.decode_head(t_feats)
            s_logits = self.student.decode_head(s_feats)
            losses['loss_kd_seg'] = self._w('seg') * kl_div_with_temperature(
                t_logits, s_logits, T, dim=1)
        if self._w('seg_aux') > 0 and getattr(self.student, 'with_auxiliary_head', False):
            t_heads, s_heads = self.teacher.auxiliary_head, self.student.auxiliary_head
            if not isinstance(s_heads, nn.ModuleList):
                t_heads, s_heads = [t_heads], [s_heads]
            aux = []
            for t_head, s_head in zip(t_heads, s_heads):
                with torch.no_grad():
                    t_logits = t_head(t_feats)
                aux.append(kl_div_with_temperature(t_logits, s_head(s_feats), T, dim=1))
            losses['loss_kd_seg_aux'] = self._w('seg_aux') * torch.stack(aux).mean()
        return losses

    # --- two-stage detection
    def _two_stage_kd(self, t_feats, s_feats, data_samples) -> Dict[str, Tensor]:
        from mmdet.structures.bbox import bbox2roi
        losses = {}
        T = self.temperature
        t_model, s_model = self.teacher, self.student
        batch_img_metas = [ds.metainfo for ds in data_samples]
        with torch.no_grad():
            t_rpn_cls, t_rpn_reg = t_model.rpn_head(t_feats)
        s_rpn_cls, s_rpn_reg = s_model.rpn_head(s_feats)
        if self._w('rpn_cls') > 0 or self._w('rpn_reg') > 0:
            l_cls, l_reg = rpn_kd_loss(t_rpn_cls, t_rpn_reg, s_rpn_cls, s_rpn_reg, T,
                                       reg_kind=self.reg_kind)
            losses['loss_kd_rpn_cls'] = self._w('rpn_cls') * l_cls
            losses['loss_kd_rpn_reg'] = self._w('rpn_reg') * l_reg
        # Proposals of the TEACHER's RPN, shared by both RoI heads.
        with torch.no_grad():
            rpn_cfg = t_model.test_cfg.rpn if t_model.test_cfg is not None else None
            if t_model.train_cfg is not None:
                rpn_cfg = t_model.train_cfg.get('rpn_proposal', rpn_cfg)
            proposals = t_model.rpn_head.predict_by_feat(
                t_rpn_cls, t_rpn_reg, batch_img_metas=batch_img_metas, cfg=rpn_cfg,
                rescale=False)
            if self.max_kd_rois is not None:  # sorted by score: keep the best
                proposals = [p[:self.max_kd_rois] for p in proposals]
            rois = bbox2roi([p.bboxes for p in proposals]).detach()
        num_per_img = [len(p) for p in proposals]
        t_roi, s_roi = t_model.roi_head, s_model.roi_head
        cascade = hasattr(t_roi, 'num_stages')
        stages = range(t_roi.num_stages) if cascade else [None]
        cls_terms, reg_terms = [], []
        t_cls = None
        for stage in stages:
            args = (stage, ) if cascade else ()
            with torch.no_grad():
                t_out = t_roi._bbox_forward(*args, t_feats, rois)
            s_out = s_roi._bbox_forward(*args, s_feats, rois)
            l_cls, l_reg = roi_bbox_kd_loss(t_out['cls_score'], t_out['bbox_pred'],
                                            s_out['cls_score'], s_out['bbox_pred'], T,
                                            reg_kind=self.reg_kind)
            cls_terms.append(l_cls)
            reg_terms.append(l_reg)
            t_cls = t_out['cls_score']
            if cascade and stage < t_roi.num_stages - 1:
                rois = self._refine_rois(t_roi.bbox_head[stage], rois, t_out, num_per_img,
                                         batch_img_metas)
        losses['loss_kd_roi_cls'] = self._w('roi_cls') * torch.stack(cls_terms).mean()
        losses['loss_kd_roi_reg'] = self._w('roi_reg') * torch.stack(reg_terms).mean()
        if getattr(t_roi, 'with_mask', False) and self._w('roi_mask') > 0:
            mask_rois, labels = self._select_mask_rois(rois, t_cls, num_per_img)
            args = (t_roi.num_stages - 1, ) if cascade else ()
            with torch.no_grad():
                t_masks = t_roi._mask_forward(*args, t_feats, mask_rois)['mask_preds']
            s_masks = s_roi._mask_forward(*args, s_feats, mask_rois)['mask_preds']
            losses['loss_kd_roi_mask'] = self._w('roi_mask') * roi_mask_kd_loss(
                t_masks, s_masks, labels, T)
        return losses

    @torch.no_grad()
    def _refine_rois(self, bbox_head, rois: Tensor, t_out: dict, num_per_img: List[int],
                     batch_img_metas: List[dict]) -> Tensor:
        """Cascade: next stage's RoIs from the TEACHER's regression (shared by both)."""
        from mmdet.structures.bbox import get_box_tensor
        cls_scores = t_out['cls_score'].split(num_per_img, 0)
        bbox_preds = t_out['bbox_pred'].split(num_per_img, 0)
        refined = []
        for i, img_rois in enumerate(rois.split(num_per_img, 0)):
            if img_rois.shape[0] == 0:
                refined.append(img_rois)
                continue
            labels = cls_scores[i][:, :-1].argmax(dim=1)
            boxes = get_box_tensor(bbox_head.regress_by_class(
                img_rois[:, 1:], labels, bbox_preds[i], batch_img_metas[i]))
            refined.append(torch.cat([img_rois[:, :1], boxes], dim=1))
        return torch.cat(refined).detach()

    @torch.no_grad()
    def _select_mask_rois(self, rois: Tensor, t_cls: Tensor, num_per_img: List[int]):
        """Per image, the ``num_mask_rois`` RoIs the teacher deems most foreground, with the
        teacher's class for each."""
        probs = torch.softmax(t_cls.float(), dim=1)[:, :-1]
        fg, labels = probs.max(dim=1)
        keep = []
        start = 0
        for n in num_per_img:
            k = min(n, self.num_mask_rois)
            if k > 0:
                keep.append(start + fg[start:start + n].topk(k).indices)
            start += n
        keep = torch.cat(keep) if keep else rois.new_zeros(0, dtype=torch.long)
        return rois[keep], labels[keep]


def unwrap_distiller(model) -> Optional[MimiQDistiller]:
    """The MimiQDistiller inside a (DDP-)wrapped model, or None."""
    from mmengine.model import is_model_wrapper
    if is_model_wrapper(model):
        model = model.module
    return model if isinstance(model, MimiQDistiller) else None
