"""Export a MimiQ checkpoint as a deployable quantized checkpoint (integer weights, int4
packed two per byte, plus scales / zero points / activation steps).

    python tools/export.py CONFIG CHECKPOINT --out work_dirs/x/quantized.pth
                           [--cfg-options ...] [--verify]

Rebuild it later with ``mimiq_mm.export.build_quantized_model(path)``.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mimiq_mm  # noqa: E402,F401


def parse_args(argv=None):
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Export a quantized MimiQ checkpoint')
    parser.add_argument('config', help='the MimiQ config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='MimiQ checkpoint (tools/train.py output)')
    parser.add_argument('--out', required=True, help='output file (.pth)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    parser.add_argument('--verify', action='store_true',
                        help='rebuild from the export and compare outputs on a random input')
    return parser.parse_args(argv)


def _human(n: int) -> str:
    return f'{n / 2**20:.2f} MiB'


def main(argv=None):
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mimiq_mm.engine import apply_mimiq_fields, check_checkpoint_matches, is_mimiq_config
    from mimiq_mm.export import (build_quantized_model, export_quantized, float_state_dict,
                                 serialized_size)
    from mimiq_mm.models import MimiQDistiller
    from mimiq_mm.registry import MODELS

    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    apply_mimiq_fields(cfg)
    if not is_mimiq_config(cfg):
        raise ValueError(f'{args.config} is not a MimiQ config (model.type must be '
                         'mimiq_mm.MimiQDistiller)')
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_cfg = cfg.model.copy()
    model_cfg.load_teacher = False
    model = MODELS.build(model_cfg)
    assert isinstance(model, MimiQDistiller)
    from mimiq_mm.utils.checkpoint import load_checkpoint_file
    ckpt = load_checkpoint_file(args.checkpoint, map_location='cpu', what='checkpoint')
    # the one guard of every tool: strict keys and the config's quantization recipe
    check_checkpoint_matches(ckpt, model, f'checkpoint {args.checkpoint!r}')
    state = ckpt.get('state_dict', ckpt)
    state = {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    model.eval()
    teacher_cfg = cfg.model.teacher.to_dict() if hasattr(cfg.model.teacher, 'to_dict') \
        else dict(cfg.model.teacher)
    scope = teacher_cfg.pop('_scope_', None) or cfg.get('default_scope')
    payload = export_quantized(model.student, args.out, teacher_cfg=teacher_cfg,
                               quant_cfg=cfg.model.get('quant_cfg'), scope=scope)
    q_size = os.path.getsize(args.out)
    float_size = serialized_size(float_state_dict(model.student))
    n_q = len(payload['quantized_weights'])
    print(f'exported {n_q} integer weight tensors to {args.out}')
    print(f'size: {_human(q_size)} quantized vs {_human(float_size)} float weights '
          f'({float_size / max(q_size, 1):.2f}x smaller)')
    teacher_ckpt = cfg.model.get('teacher_checkpoint')
    if teacher_ckpt and osp.isfile(teacher_ckpt):
        print(f'float teacher checkpoint file: {_human(os.path.getsize(teacher_ckpt))}')
    if args.verify:
        rebuilt = build_quantized_model(args.out)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            a = model.student.extract_feat(x)
            b = rebuilt.extract_feat(x)
        same = all(torch.equal(u, v) for u, v in zip(a, b))
        print(f'verify: rebuilt model features identical: {same}')
        if not same:
            raise SystemExit(1)
    return dict(path=args.out, quantized_bytes=q_size, float_bytes=float_size,
                num_quantized=n_q)


if __name__ == '__main__':
    main()
