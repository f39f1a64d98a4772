"""exit_after_distributed_run: a process that ran DDP and destroyed its process group leaves
with its logs complete and exit status 0; a process that never ran distributed is left to
the normal interpreter exit."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import logging, os, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from mimiq_mm.engine import close_distributed, exit_after_distributed_run
    log = logging.getLogger('run')
    log.addHandler(logging.FileHandler(sys.argv[1]))
    log.setLevel(logging.INFO)
    if sys.argv[2] == 'ddp':
        dist.init_process_group('gloo', init_method='file://' + sys.argv[1] + '.store',
                                rank=0, world_size=1)
        model = DDP(torch.nn.Linear(8, 8))
        model(torch.randn(4, 8)).sum().backward()
        close_distributed()
    log.info('final metrics: 0.5')
    sys.stdout.write('no newline at the end, buffered')
    import atexit
    atexit.register(lambda: print('ATEXIT RAN'))
    exit_after_distributed_run()
    print('exit_after_distributed_run returned')
''')


def _run(tmp_path, mode):
    log = tmp_path / f'{mode}.log'
    proc = subprocess.run([sys.executable, '-c', SCRIPT, str(log), mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc, log.read_text()


def test_after_a_ddp_run_the_process_exits_0_with_logs_flushed(tmp_path):
    proc, log = _run(tmp_path, 'ddp')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert log.strip() == 'final metrics: 0.5'          # file handler flushed and closed
    assert proc.stdout == 'no newline at the end, buffered'  # stdout flushed
    # it left right there: no code after it, no interpreter finalization (atexit)
    assert 'returned' not in proc.stdout and 'ATEXIT RAN' not in proc.stdout


def test_without_distributed_run_it_returns(tmp_path):
    proc, log = _run(tmp_path, 'plain')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'exit_after_distributed_run returned' in proc.stdout
    assert 'ATEXIT RAN' in proc.stdout and log.strip() == 'final metrics: 0.5'
