"""tools/setup_env.sh: a checkout's venv is a few MB on top of the shared dependency env.

These run the real script against the dependency environment that `make setup` made for the
running test session (MIMIQ_NO_DEPS_BUILD=1 makes sure they never start a 6 GB build).
"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'setup_env.sh'


def _deps_env():
    """The dependency env behind the running interpreter's venv, and the spec it was built for."""
    marker = Path(sys.prefix) / '.mimiq-deps'
    assert marker.is_file(), (f'{sys.prefix} was not made by tools/setup_env.sh: run the tests '
                              'with `make test` (or `.venv/bin/python -m pytest`)')
    deps = Path(marker.read_text().strip())
    assert (deps / '.complete').is_file(), deps
    spec = dict(line.split('=', 1) for line in (deps / '.spec').read_text().splitlines())
    return deps, spec


def _run_setup(venv, **extra_env):
    deps, spec = _deps_env()
    env = dict(os.environ, VENV=str(venv), MIMIQ_ENV_CACHE=str(deps.parent),
               PYTHON=spec['PYTHON'], TORCH_SPEC=spec['TORCH_SPEC'], MIMIQ_NO_DEPS_BUILD='1',
               MIMIQ_KEEP_ENVS='100')  # never prune another env from inside a test
    env.update(extra_env)
    return subprocess.run(['bash', str(SCRIPT)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def _size(path):
    return sum(f.stat().st_size for f in Path(path).rglob('*') if f.is_file()
               and not f.is_symlink())


def test_fresh_venv_is_small_sees_deps_and_imports_this_checkout(tmp_path):
    venv = tmp_path / 'venv'
    first = _run_setup(venv)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert 'installing this checkout' in first.stdout
    assert '[setup] ok: torch' in first.stdout
    deps, _ = _deps_env()
    assert (venv / '.mimiq-deps').read_text().strip() == str(deps)
    assert _size(venv) < 5 * 2 ** 20          # the 6 GB stay in the shared env
    probe = subprocess.run(
        [str(venv / 'bin' / 'python'), '-c',
         'import mimiq_mm, torch, mmcv.ops, mmdet; '
         'print(mimiq_mm.__file__); print(torch.__file__)'],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    ours, torch_file = probe.stdout.split()
    assert Path(ours).resolve().parent == REPO / 'mimiq_mm'
    assert Path(torch_file).resolve().is_relative_to(deps.resolve())

    again = _run_setup(venv)                 # idempotent: only the import check runs
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'installing' not in again.stdout and '[setup] ok: torch' in again.stdout


def test_refuses_a_venv_it_did_not_make(tmp_path):
    venv = tmp_path / 'venv'
    venv.mkdir()
    (venv / 'keep.txt').write_text('user data')
    proc = _run_setup(venv)
    assert proc.returncode != 0
    assert 'was not made by this script' in proc.stderr
    assert (venv / 'keep.txt').read_text() == 'user data'


def test_missing_deps_env_is_an_error_not_a_silent_build(tmp_path):
    proc = _run_setup(tmp_path / 'venv', MIMIQ_ENV_CACHE=str(tmp_path / 'empty_cache'))
    assert proc.returncode != 0
    assert 'MIMIQ_NO_DEPS_BUILD=1 forbids building it' in proc.stderr
    assert not (tmp_path / 'venv').exists()
    assert not any((tmp_path / 'empty_cache').glob('deps-*/bin'))
