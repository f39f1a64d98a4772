"""Synthetic data generation: L_sim goes down, resumable folder, bad input, baselines, CLI."""
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimiq_mm.attention import AttentionRecorder, adapt_attention_
from mimiq_mm.losses.attention_similarity import inter_head_similarity_loss
from mimiq_mm.synthesis import (BatchContext, NonFiniteSynthesisError, SynthesisConfig,
                                as_teacher, batch_seed, build_method, check_image,
                                corrupt_batches,
                                patch_similarity_entropy, psaq_loss, synthesize)
from mimiq_mm.testing import build_tiny_model, tiny_timm_swin, tiny_timm_vit

REPO = Path(__file__).resolve().parents[1]
# small and quiet: a few iterations, no figures unless a test wants them
FAST = dict(num_images=5, batch_size=2, iterations=3, image_size=32, log_interval=1,
            progress=False, figures=False)


def _pixels(folder):
    folder = Path(folder) / 'images'
    return {p.name: np.array(Image.open(p)) for p in sorted(folder.iterdir())}


def _l_sim(teacher, x):
    with torch.no_grad(), AttentionRecorder(teacher.attention_scope) as rec:
        teacher.features(x)
    return inter_head_similarity_loss(rec.records).item()


@pytest.fixture(scope='module')
def vit():
    torch.manual_seed(0)
    return tiny_timm_vit(img_size=32)


@pytest.mark.parametrize('make, size', [(lambda: tiny_timm_vit(img_size=64), 64),
                                        (lambda: tiny_timm_swin(img_size=32), 32)],
                         ids=['vit', 'swin'])
def test_optimisation_lowers_lsim(make, size):
    torch.manual_seed(0)
    teacher = as_teacher(make())
    adapt_attention_(teacher.attention_scope)
    cfg = SynthesisConfig(iterations=6, image_size=size, noise_std=0.0, jitter=(0, 0),
                          color_jitter=0.0, w_tv=0.0, progress=False)
    with teacher.frozen():
        method = build_method(cfg, teacher, attention=True)
        gen = torch.Generator().manual_seed(1)
        ctx = BatchContext(0, 2, 1, gen, torch.device('cpu'), [0, 1])
        x0 = method.initial_pixels(ctx)
        gen.manual_seed(1)
        result = method.generate(ctx)
        before, after = _l_sim(teacher, x0), _l_sim(teacher, result.x)
    assert after < 0.95 * before, (before, after)
    assert result.losses['sim'] < result.history[0]['sim'] or after < before
    low, high = teacher.pixel_range()
    assert bool(((result.x >= low - 1e-6) & (result.x <= high + 1e-6)).all())
    # frozen() restored the teacher's flags
    assert all(p.requires_grad for p in teacher.model.parameters())


def test_folder_layout_manifest_and_figures(tmp_path, vit):
    out = synthesize(vit, tmp_path / 'syn', dict(FAST, figures=True, image_size=(32, 48),
                                                   seed=3))
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['method'] == 'mimiq' and manifest['seed'] == 3
    assert manifest['image_size'] == [32, 48] and manifest['complete'] is True
    assert manifest['mean'] == pytest.approx([0.5 * 255] * 3)      # test_vit's pretrained_cfg
    assert len(manifest['batches']) == 3 and manifest['config']['w_tv'] == 2.5e-5
    names = sorted(p.name for p in (out / 'images').iterdir())
    assert names == [f'{i:06d}.png' for i in range(5)]
    for name in names:
        with Image.open(out / 'images' / name) as img:
            assert img.mode == 'RGB' and img.size == (48, 32)
    record = json.loads((out / 'batches' / 'batch_00002.json').read_text())
    assert record['images'] == ['000004.png'] and record['image_ids'] == [4]
    assert record['seed'] == batch_seed(3, 2)
    assert set(record['losses']) >= {'sim', 'tv', 'loss'}
    assert 0 <= record['ssim_after']['ssim_sq'] <= 1
    assert (out / 'contact_sheet.png').is_file() and (out / 'attention_heads.png').is_file()
    assert not list(out.rglob('.*.tmp-*'))


def test_interrupt_and_resume_gives_same_images(tmp_path, vit):
    reference = _pixels(synthesize(vit, tmp_path / 'full', FAST))

    class Killed(Exception):
        pass

    def kill_after_first(batch_index, record):
        if batch_index == 0:
            raise Killed

    out = tmp_path / 'resumed'
    with pytest.raises(Killed):
        synthesize(vit, out, FAST, on_batch_end=kill_after_first)
    assert sorted(p.name for p in (out / 'batches').iterdir()) == ['batch_00000.json']
    # debris a kill can leave: a half-written temp file and an image of the unfinished batch
    (out / 'images' / '.000002.png.tmp-r0').write_bytes(b'\x89PNG half')
    (out / 'images' / '000002.png').write_bytes(b'garbage')
    finished_before = (out / 'images' / '000000.png').stat().st_mtime_ns
    synthesize(vit, out, FAST)
    assert (out / 'images' / '000000.png').stat().st_mtime_ns == finished_before  # kept
    resumed = _pixels(out)
    assert sorted(resumed) == sorted(reference)          # no duplicates, no debris
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])
    assert len(list((out / 'batches').iterdir())) == 3


def test_ranks_generate_disjoint_shards_of_the_same_set(tmp_path, vit):
    reference = _pixels(synthesize(vit, tmp_path / 'one', FAST))
    seen = []
    for rank in (0, 1):
        synthesize(vit, tmp_path / 'two', FAST, rank=rank, world_size=2,
                   on_batch_end=lambda b, r: seen.append((b, r['rank'])))
    assert sorted(seen) == [(0, 0), (1, 1), (2, 0)]
    sharded = _pixels(tmp_path / 'two')
    assert sorted(sharded) == sorted(reference)
    for name in reference:
        np.testing.assert_array_equal(sharded[name], reference[name])


def test_nan_raises_naming_batch_and_step_and_keeps_images(tmp_path):
    torch.manual_seed(0)
    model = tiny_timm_vit(img_size=32)

    def poison(batch_index, record):
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.fill_(float('nan'))

    out = tmp_path / 'nan'
    with pytest.raises(NonFiniteSynthesisError, match=r'batch 1 at step 0') as info:
        synthesize(model, out, FAST, on_batch_end=poison)
    assert info.value.batch_index == 1 and info.value.step == 0
    assert sorted(p.name for p in (out / 'batches').iterdir()) == ['batch_00000.json']
    for name in ('000000.png', '000001.png'):
        assert check_image(out / 'images' / name, (32, 32)) is None


def test_corrupt_image_is_reported_and_regenerated(tmp_path, vit, caplog):
    out = synthesize(vit, tmp_path / 'c', FAST)
    reference = _pixels(out)
    target = out / 'images' / '000003.png'
    target.write_bytes(target.read_bytes()[:40])            # truncated PNG
    assert 'unreadable' in check_image(target)
    with caplog.at_level(logging.WARNING, logger='mimiq_mm.synthesis'):
        synthesize(vit, out, FAST)
    assert any('000003.png' in r.getMessage() and 'batch 1' in r.getMessage()
               for r in caplog.records)
    np.testing.assert_array_equal(_pixels(out)['000003.png'], reference['000003.png'])
    record = json.loads((out / 'batches' / 'batch_00001.json').read_text())
    assert record['regenerated_because'][0]['file'] == '000003.png'


def test_corrupt_batches_reports_without_touching_the_set(tmp_path, vit):
    out = synthesize(vit, tmp_path / 'cb', FAST)
    assert corrupt_batches(out, FAST) == {}
    (out / 'images' / '000003.png').write_bytes(b'not a png')
    (out / 'images' / '000000.png').unlink()
    bad = corrupt_batches(out, FAST)
    assert sorted(bad) == [0, 1]
    assert bad[0] == [('000000.png', 'missing')] and 'unreadable' in bad[1][0][1]
    assert len(list((out / 'batches').glob('batch_*.json'))) == 3  # nothing invalidated
    assert corrupt_batches(out, dict(FAST, check_images_on_resume=False)) == {}


def test_resume_with_other_settings_is_refused(tmp_path, vit):
    synthesize(vit, tmp_path / 'r', dict(FAST, num_images=2))
    with pytest.raises(ValueError, match='seed'):
        synthesize(vit, tmp_path / 'r', dict(FAST, num_images=2, seed=7))


def test_a_set_is_tied_to_its_teacher_weights(tmp_path, vit):
    from mimiq_mm.synthesis import check_synthetic_set
    from mimiq_mm.synthesis.teacher import weights_fingerprint
    settings = SynthesisConfig.from_dict(dict(FAST, num_images=2))
    out = synthesize(vit, tmp_path / 'tied', settings)
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['teacher_weights'] == weights_fingerprint(vit)
    check_synthetic_set(out, settings, vit)                  # same weights: fine
    # the attention adapters rename a ViT's keys, not its values
    torch.manual_seed(0)
    renamed = build_tiny_model('upernet_vit')
    before = weights_fingerprint(renamed)
    keys = list(renamed.state_dict())
    adapt_attention_(renamed.backbone)
    assert list(renamed.state_dict()) != keys and weights_fingerprint(renamed) == before
    # one changed value is another teacher: refused for reuse and for resuming
    other = tiny_timm_vit(img_size=32)
    other.load_state_dict(vit.state_dict())
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(ValueError, match='teacher_weights'):
        check_synthetic_set(out, settings, other)
    with pytest.raises(ValueError, match='teacher_weights'):
        synthesize(other, out, settings)


def test_psaq_entropy_prefers_diverse_patches():
    gen = torch.Generator().manual_seed(0)
    same = torch.randn(1, 1, 16, generator=gen).expand(2, 20, 16)
    diverse = torch.randn(2, 20, 16, generator=gen)
    h_same = patch_similarity_entropy(same, gen)
    h_diverse = patch_similarity_entropy(diverse, gen)
    assert h_same.shape == (2,) and bool((h_diverse > h_same + 1.0).all())
    tokens = diverse.clone().requires_grad_(True)
    psaq_loss([tokens], gen).backward()
    assert torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0


def test_gaussian_psaq_and_real_baselines(tmp_path, vit):
    gauss = synthesize(vit, tmp_path / 'g', dict(FAST, method='gaussian', num_images=2))
    record = json.loads((gauss / 'batches' / 'batch_00000.json').read_text())
    assert record['losses'] == {} and record['ssim_before'] == record['ssim_after']

    psaq = synthesize(vit, tmp_path / 'p', dict(FAST, method='psaq', num_images=2))
    record = json.loads((psaq / 'batches' / 'batch_00000.json').read_text())
    assert set(record['losses']) >= {'psaq', 'tv'} and np.isfinite(record['losses']['psaq'])

    real_root = tmp_path / 'photos'
    real_root.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 60), (90, 30), (33, 33)]):
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
            real_root / f'{i}.jpg')
    real = synthesize(None, tmp_path / 'real', dict(FAST, method='real', num_images=3,
                                                    image_size=(24, 40),
                                                    real_root=str(real_root)))
    for i in range(3):
        assert check_image(real / 'images' / f'{i:06d}.png', (24, 40)) is None
    with pytest.raises(ValueError, match='fewer than'):
        synthesize(None, tmp_path / 'real2', dict(FAST, method='real', num_images=9,
                                                  real_root=str(real_root)))


@pytest.mark.parametrize('name', ['upernet_swin', 'maskrcnn_swin'])
def test_task_loss_through_openmmlab_heads(tmp_path, name):
    torch.manual_seed(0)
    model = build_tiny_model(name)
    out = synthesize(model, tmp_path / name,
                     dict(FAST, num_images=1, batch_size=1, iterations=2,
                          image_size=(64, 96), task_loss='task'))
    record = json.loads((out / 'batches' / 'batch_00000.json').read_text())
    assert np.isfinite(record['losses']['task']) and record['losses']['task'] > 0
    assert np.isfinite(record['losses']['sim'])
    assert check_image(out / 'images' / '000000.png', (64, 96)) is None


def test_bad_settings_and_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match='valid'):
        SynthesisConfig.from_dict(dict(iterationz=3))
    with pytest.raises(ValueError, match="'mimiq'"):
        SynthesisConfig.from_dict(dict(method='dream'))
    # a value of the wrong type names the field (not int()'s "invalid literal")
    for bad, match in ((dict(num_images='abc'), 'synthesis.num_images must be int'),
                       (dict(batch_size=True), 'synthesis.batch_size must be int'),
                       (dict(lr='fast'), 'synthesis.lr must be float'),
                       (dict(progress='yes'), 'synthesis.progress must be bool')):
        with pytest.raises(TypeError, match=match):
            SynthesisConfig.from_dict(bad)
    assert SynthesisConfig.from_dict(dict(lr=1, num_images=np.int64(4))).num_images == 4
    spec = importlib.util.spec_from_file_location('generate_cli', REPO / 'tools' / 'generate.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    missing = tmp_path / 'nope.pth'
    with pytest.raises(FileNotFoundError, match='teacher.checkpoint') as info:
        cli.main([str(REPO / 'configs/synthesis/mimiq_deit-s_timm.py'), '--work-dir',
                  str(tmp_path / 'x'), '--cfg-options', f'teacher.checkpoint={missing}',
                  'teacher.model.name=test_vit'])
    assert str(missing) in str(info.value)


def test_cli_generates_from_config(tmp_path):
    spec = importlib.util.spec_from_file_location('generate_cli', REPO / 'tools' / 'generate.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = cli.main([str(REPO / 'configs/synthesis/mimiq_deit-s_timm.py'), '--work-dir',
                    str(tmp_path / 'cli'), '--cfg-options', 'teacher.checkpoint=None',
                    'teacher.model.name=test_vit', 'teacher.model.img_size=32',
                    'synthesis.num_images=2', 'synthesis.batch_size=2',
                    'synthesis.iterations=2', 'synthesis.image_size=32',
                    'synthesis.progress=False'])
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['complete'] and manifest['config']['task_loss'] == 'classifier'
    assert manifest['teacher']['name'] == 'test_vit'
    assert (out / 'contact_sheet.png').is_file()


def test_build_teacher_loads_checkpoint_and_preprocessor_stats(tmp_path):
    from mmengine.config import Config

    from mimiq_mm.synthesis import build_teacher
    from mimiq_mm.testing import tiny_upernet_swin_cfg
    torch.manual_seed(0)
    source = build_tiny_model('upernet_swin')
    path = tmp_path / 'teacher.pth'
    torch.save({'state_dict': source.state_dict()}, path)
    cfg = Config(dict(model=tiny_upernet_swin_cfg().model,
                      teacher=dict(scope='mmseg', checkpoint=str(path))))
    teacher = build_teacher(cfg)
    for (name, p), q in zip(source.state_dict().items(), teacher.model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    pre = source.data_preprocessor
    assert teacher.mean == pytest.approx(pre.mean.flatten().tolist())
    assert teacher.std == pytest.approx(pre.std.flatten().tolist())
    assert teacher.channel_order == 'rgb' and teacher.kind == 'mmseg'
    low, high = teacher.pixel_range()
    torch.testing.assert_close(low.flatten(), -pre.mean.flatten() / pre.std.flatten())

    # the checkpoint of another model, a quantized student's, or a truncated file: an error
    # that names the file (never a silently random teacher)
    student = tmp_path / 'student.pth'
    torch.save({'state_dict': {f'student.{k}': v for k, v in source.state_dict().items()}},
               student)
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': build_tiny_model('upernet_swin', num_classes=7).state_dict()},
               other)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(path.read_bytes()[:1000])
    for bad, match in ((student, 'quantized student'), (other, 'shape mismatches'),
                       (truncated, 'cannot be read')):
        cfg.teacher.checkpoint = str(bad)
        with pytest.raises((RuntimeError, ValueError), match=match) as info:
            build_teacher(cfg)
        assert f'teacher.checkpoint={str(bad)!r}' in str(info.value)


def test_w_sim_zero_ablation_uses_the_task_term_only(tmp_path, vit):
    out = synthesize(vit, tmp_path / 'a', dict(FAST, num_images=2, w_sim=0.0,
                                               task_loss='classifier'))
    record = json.loads((out / 'batches' / 'batch_00000.json').read_text())
    assert 'sim' not in record['losses'] and np.isfinite(record['losses']['task'])
    with pytest.raises(ValueError, match='needs a task term'):
        synthesize(vit, tmp_path / 'b', dict(FAST, num_images=2, w_sim=0.0))
