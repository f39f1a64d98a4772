"""Issue 15, defect 6 and its rough edges: the completeness check of the training run, the
writer and the dataset reader agree on what a finished batch is, so a damaged batch record
is regenerated instead of crashing every training run; a damaged manifest is named; a
non-finite synthesis setting is refused."""
import json
import math

import pytest
import torch

from mimiq_mm.datasets import SyntheticImageDataset
from mimiq_mm.engine import synthetic_set_complete
from mimiq_mm.synthesis import SynthesisConfig, synthesize
from mimiq_mm.testing import tiny_timm_vit

SETTINGS = dict(method='gaussian', num_images=4, batch_size=2, image_size=(32, 32),
                progress=False, figures=False, device='cpu')


@pytest.fixture
def finished_set(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_timm_vit(img_size=32)
    root = tmp_path / 'syn'
    synthesize(teacher, root, SETTINGS)
    assert synthetic_set_complete(str(root), 2)
    return teacher, root


def test_truncated_batch_record_is_unfinished_and_regenerated(finished_set):
    teacher, root = finished_set
    record = root / 'batches' / 'batch_00001.json'
    original = json.loads(record.read_text())
    text = record.read_text()
    record.write_text(text[:len(text) // 2])  # e.g. a disk that filled up
    # the check the training run does before "Synthetic set found; skipping synthesis"
    assert not synthetic_set_complete(str(root), 2)
    # the reader skips what the writer would regenerate, instead of a JSONDecodeError
    dataset = SyntheticImageDataset(data_root=str(root))
    assert sorted(dataset.get_data_info(i)['img_id'] for i in range(len(dataset))) == [0, 1]
    with pytest.raises(RuntimeError, match='1 of 2 batches finished'):
        SyntheticImageDataset(data_root=str(root), require_complete=True)
    # synthesis regenerates exactly that batch; the set is then complete and readable
    synthesize(teacher, root, SETTINGS)
    again = json.loads(record.read_text())
    assert again['images'] == original['images'] and again['seed'] == original['seed']
    assert synthetic_set_complete(str(root), 2)
    assert len(SyntheticImageDataset(data_root=str(root))) == 4


def test_record_without_image_list_counts_as_unfinished(finished_set):
    _, root = finished_set
    (root / 'batches' / 'batch_00000.json').write_text('{"batch_index": 0}\n')
    assert not synthetic_set_complete(str(root), 2)
    assert len(SyntheticImageDataset(data_root=str(root))) == 2


def test_truncated_manifest_is_named(finished_set):
    teacher, root = finished_set
    manifest = root / 'manifest.json'
    manifest.write_text(manifest.read_text()[:20])
    with pytest.raises(ValueError, match=r'manifest\.json is not valid JSON'):
        SyntheticImageDataset(data_root=str(root))
    with pytest.raises(ValueError, match=r'manifest\.json is not valid JSON'):
        synthesize(teacher, root, SETTINGS)


@pytest.mark.parametrize('field,value', [('lr', math.nan), ('w_tv', math.inf),
                                         ('noise_std', -math.inf)])
def test_non_finite_synthesis_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f'synthesis.{field}=.* not a finite number'):
        SynthesisConfig.from_dict({field: value})


def test_refused_set_names_the_train_option(finished_set):
    teacher, root = finished_set
    with pytest.raises(ValueError, match='synthetic_root=DIR'):
        synthesize(teacher, root, dict(SETTINGS, seed=1))


def test_second_writer_on_the_same_folder_stops_at_once(finished_set):
    """Two tools/generate.py on one folder used to redo the same batches and one died on
    a temporary file the other had renamed. Here another process holds shard 0."""
    import subprocess
    import sys
    teacher, root = finished_set
    (root / 'batches' / 'batch_00001.json').unlink()  # work left for a writer
    holder = subprocess.Popen(
        [sys.executable, '-c',
         'import fcntl, os, sys\n'
         'f = open(sys.argv[1], "a+")\n'
         'fcntl.flock(f.fileno(), fcntl.LOCK_EX)\n'
         'f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()\n'
         'print("locked", flush=True)\n'
         'sys.stdin.read()\n', str(root / '.lock-r0')],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(RuntimeError, match=f'another process \\(pid {holder.pid}'):
            synthesize(teacher, root, SETTINGS)
        assert not (root / 'batches' / 'batch_00001.json').exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # once the folder is free, the same call does the remaining batch
    synthesize(teacher, root, SETTINGS)
    assert synthetic_set_complete(str(root), 2)
