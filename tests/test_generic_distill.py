"""quantize_and_distill: the MimiQ calibration + fine-tuning of any nn.Module (here a timm
ViT with its own head), and its data-free keep-the-better-student decision."""
import pytest
import timm
import torch

from mimiq_mm.models.generic import (DistillSettings, distill_losses, heldout_loss,
                                     output_distill_loss, quantize_and_distill)
from mimiq_mm.quant import QuantConfig, quantizers


def _vit():
    torch.manual_seed(0)
    return timm.create_model('test_vit', img_size=32, patch_size=8, num_classes=5).eval()


def _images(n=16):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_quantize_and_distill_on_a_timm_classifier():
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images()
    student, report = quantize_and_distill(
        model, images, QuantConfig(), DistillSettings(iters=6, batch_size=4, holdout=0.25,
                                                      log_interval=3), progress=None)
    # the float model is untouched and still a float model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(quantizers(model))
    qs = [q for _, q in quantizers(student)]
    assert qs and all(q.is_initialized for q in qs)
    assert report['num_train_batches'] == 3 and report['num_heldout_batches'] == 1
    assert report['gptq_summary'].startswith('GPTQ rounded ')  # the default rounding
    assert report['kept'] in ('finetuned', 'ptq')
    assert [h['iter'] for h in report['history']] == [3, 6]
    assert set(report['history'][0]) == {'iter', 'loss_hsad', 'loss_kd_out'}
    # the decision follows the held-out losses it reports
    better = report['heldout_finetuned'] <= report['heldout_ptq']
    assert report['kept'] == ('finetuned' if better else 'ptq')
    with torch.no_grad():
        out = student(images[:2])
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_fine_tuning_that_hurts_is_rolled_back():
    """A learning rate far too high wrecks the student: the held-out distillation loss
    rises, and the calibrated (PTQ) student is returned instead."""
    model = _vit()
    images = _images()
    # the same calibration batches as the run below (its last batch is held out)
    ptq, _ = quantize_and_distill(model, images[:12], QuantConfig(),
                                  DistillSettings(iters=0, batch_size=4), progress=None)
    student, report = quantize_and_distill(
        model, images, QuantConfig(),
        DistillSettings(iters=4, batch_size=4, lr=1.0, step_lr_mult=1.0, holdout=0.25,
                        clip_grad=None), progress=None)
    assert report['heldout_finetuned'] > report['heldout_ptq']
    assert report['kept'] == 'ptq'
    # same calibration batches: the kept student is the PTQ one, bit for bit
    s_ptq, s_kept = ptq.state_dict(), student.state_dict()
    assert set(s_ptq) == set(s_kept)
    assert all(torch.equal(s_ptq[k], s_kept[k]) for k in s_ptq)


def test_ptq_only_reports_no_fine_tuning():
    student, report = quantize_and_distill(_vit(), _images(8), QuantConfig(),
                                           DistillSettings(iters=0, batch_size=4),
                                           progress=None)
    assert report['kept'] == 'ptq (no fine-tuning)' and report['num_heldout_batches'] == 0


@pytest.mark.parametrize('bad, match', [
    (dict(iters=-1), 'iters'), (dict(lr=float('nan')), 'lr'), (dict(gamma=float('inf')), 'gamma'),
    (dict(holdout=1.0), 'holdout'), (dict(hsad_kind='kl'), 'hsad_kind'),
    (dict(gamma=0.0, output_weight=0.0), 'nothing to fine-tune'),
    (dict(train_scope='heads'), 'train_scope')])
def test_settings_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        DistillSettings(**bad)


@pytest.mark.parametrize('train_scope', ['layers', 'steps', 'weights'])
def test_train_scope_limits_what_fine_tuning_moves(train_scope):
    """'layers' moves the quantized layers' weights and steps but leaves LayerNorms,
    position table and class token the teacher's; 'steps' moves the learnt steps alone;
    'weights' moves LayerNorms and weights but no step."""
    from mimiq_mm.quant import quant_modules
    model = _vit()
    images = _images(8)
    ptq, _ = quantize_and_distill(model, images, QuantConfig(),
                                  DistillSettings(iters=0, batch_size=4), progress=None)
    student, report = quantize_and_distill(
        model, images, QuantConfig(),
        DistillSettings(iters=4, batch_size=4, lr=1e-2, holdout=0.0, train_scope=train_scope),
        progress=None)
    assert report['kept'] == 'finetuned'
    layer_prefixes = tuple(f'{name}.' for name, _ in quant_modules(student))
    before, after = ptq.state_dict(), student.state_dict()
    moved = {k for k in before if before[k].is_floating_point()
             and not torch.equal(before[k], after[k])}
    assert moved, 'fine-tuning changed nothing'
    if train_scope == 'steps':
        assert all(k.endswith('.step') for k in moved)
    elif train_scope == 'weights':
        steps = [k for k in before if k.endswith('.step')]
        assert steps and not any(k.endswith('.step') for k in moved)
        assert 'blocks.0.norm1.weight' in moved and any(k.endswith('fc1.weight') for k in moved)
        return
    else:
        assert all(k.startswith(layer_prefixes) for k in moved)
        assert any(k.endswith('.weight') for k in moved)
    for k in ('cls_token', 'pos_embed', 'norm.weight', 'blocks.0.norm1.weight'):
        assert torch.equal(before[k], after[k]), k


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match='NaN'):
        quantize_and_distill(_vit(), torch.full((4, 3, 32, 32), float('nan')), progress=None)
    with pytest.raises(ValueError, match='float'):
        quantize_and_distill(_vit(), torch.zeros(4, 32, 32), progress=None)


def test_losses_and_heldout_score():
    model = _vit()
    student, _ = quantize_and_distill(model, _images(8), QuantConfig(),
                                      DistillSettings(iters=0, batch_size=4), progress=None)
    losses = distill_losses(model, student, _images(2))
    assert set(losses) == {'loss_hsad', 'loss_kd_out'}
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    score = heldout_loss(lambda x: distill_losses(model, student, x), [_images(2)] * 2)
    assert score == pytest.approx(float(sum(losses.values())), rel=1e-5)
    with pytest.raises(ValueError, match='different structure'):
        output_distill_loss((torch.ones(2),), (torch.ones(2), torch.ones(2)))
