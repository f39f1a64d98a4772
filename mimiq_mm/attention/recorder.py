"""Recording per-head attention logits and outputs of adapted attention modules."""
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .adapter import _SINKS, find_attention_modules, is_adapted

__all__ = ['AttentionRecord', 'AttentionRecorder']


@dataclass
class AttentionRecord:
    """One forward call of one adapted attention module.

    Attributes:
        name: fully-qualified module name, relative to the model given to the recorder.
        logits: ``(B', H, Nq, Nk)`` pre-softmax ``(q * scale) @ kᵀ`` plus relative-position
            bias and additive masks (Swin shift mask: -100; nn.MultiheadAttention bool masks:
            -inf). ``B' = batch * num_windows`` for Swin.
        output: ``(B', H, Nq, d)``, ``softmax(logits) @ v`` per head, before the output
            projection (after attention dropout when training).
        num_prefix_tokens: class/register tokens at the front of the sequence (0 for Swin).
        grid: ``(h, w)`` layout of the non-prefix key tokens when known (Swin: the window
            size; ViT: the patch grid), else None.
    """
    name: str
    logits: torch.Tensor
    output: torch.Tensor
    num_prefix_tokens: int
    grid: Optional[Tuple[int, int]]


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _grid_from_patch_embed_output(patch_embed: nn.Module, output) -> Optional[Tuple[int, int]]:
    """(h, w) of a patch embedding's output: mmcv/mmseg/mmdet ``PatchEmbed`` return
    ``(tokens, (h, w))``; timm returns NHWC / NCHW maps (dynamic size) or flat tokens with a
    static ``grid_size``. The caller checks h * w against the token count."""
    if isinstance(output, (tuple, list)) and len(output) == 2 and \
            isinstance(output[1], (tuple, list, torch.Size)) and len(output[1]) == 2:
        return int(output[1][0]), int(output[1][1])
    if isinstance(output, torch.Tensor):
        if output.dim() == 4:
            fmt = getattr(patch_embed, 'output_fmt', 'NCHW')
            if str(getattr(fmt, 'value', fmt)) == 'NHWC':
                return int(output.shape[1]), int(output.shape[2])
            return int(output.shape[2]), int(output.shape[3])
        grid = getattr(patch_embed, 'grid_size', None)
        if output.dim() == 3 and isinstance(grid, (tuple, list)) and len(grid) == 2:
            return int(grid[0]), int(grid[1])
    return None


class AttentionRecorder:
    """Context manager collecting an :class:`AttentionRecord` per call of adapted attention
    modules of ``model``::

        adapt_attention_(model)
        with AttentionRecorder(model) as rec:
            model(x)
        rec.records            # list, call order
        rec.by_name()          # {name: [records in call order]}

    Args:
        model: the model (or sub-module) whose adapted attention modules are recorded; names are
            relative to it. DataParallel/DistributedDataParallel wrappers are unwrapped.
        names: fully-qualified names of the attention modules to record (None: all adapted
            ones). Unknown names raise KeyError listing the valid names.
        detach: store detached tensors (no autograd graph kept).

    While the ``with`` block runs, the adapted modules report to this recorder and the patch
    embeddings of ViTs get a forward hook reading the patch grid; all of it is removed on exit,
    also on exceptions. Outside a recorder nothing is recorded and nothing is hooked.
    """

    def __init__(self,
                 model: nn.Module,
                 names: Optional[Iterable[str]] = None,
                 detach: bool = False) -> None:
        if isinstance(names, str):
            raise TypeError(f'names must be a list of module names, got the string {names!r}; '
                            f'write names=[{names!r}]')
        self.model = _unwrap(model)
        self.detach = bool(detach)
        adapted = {name: m for name, m in self.model.named_modules() if is_adapted(m)}
        if not adapted:
            attention = find_attention_modules(self.model)
            if attention:
                raise RuntimeError(
                    f'AttentionRecorder: {type(self.model).__name__} has no adapted attention '
                    f'module (it has attention modules: {sorted(attention)}). Call '
                    'mimiq_mm.attention.adapt_attention_(model) first.')
            raise RuntimeError(
                f'AttentionRecorder: {type(self.model).__name__} has no attention module at '
                'all (e.g. a ResNet backbone), so there are no attention heads to record: '
                'MimiQ\'s attention terms (synthesis L_sim, fine-tuning HSAD) need a '
                'transformer backbone; for a CNN set model.gamma=0 and a synthesis method '
                "other than 'mimiq' (e.g. synthesis.method='gaussian').")
        if names is None:
            self._targets = adapted
        else:
            names = list(names)
            unknown = [n for n in names if n not in adapted]
            if unknown:
                raise KeyError(f'AttentionRecorder: unknown attention module name(s) {unknown}; '
                               f'valid names: {list(adapted)}')
            self._targets = {n: m for n, m in adapted.items() if n in set(names)}
        self._module_names = {m: n for n, m in self._targets.items()}
        self._patch_embeds = self._find_patch_embeds()
        self.records: List[AttentionRecord] = []
        self._grids: Dict[nn.Module, Optional[Tuple[int, int]]] = {}
        self._handles: list = []
        self._active = False

    @property
    def names(self) -> List[str]:
        """Names of the recorded attention modules, in model order."""
        return list(self._targets)

    def _find_patch_embeds(self) -> Dict[nn.Module, nn.Module]:
        """attention module -> ``patch_embed`` child of its nearest ancestor having one."""
        found = {}
        for name, module in self._targets.items():
            parts = name.split('.') if name else []
            for depth in range(len(parts) - 1, -1, -1):
                ancestor = self.model.get_submodule('.'.join(parts[:depth]))
                patch_embed = getattr(ancestor, 'patch_embed', None)
                if isinstance(patch_embed, nn.Module):
                    found[module] = patch_embed
                    break
        return found

    def _make_grid_hook(self, patch_embed: nn.Module):

        def hook(module, args, output):
            self._grids[module] = _grid_from_patch_embed_output(module, output)

        return hook

    def _sink(self, module: nn.Module, logits: torch.Tensor, output: torch.Tensor,
              grid: Optional[Tuple[int, int]]) -> None:
        prefix = int(getattr(module, '_mimiq_num_prefix_tokens', 0))
        if grid is None:
            patch_embed = self._patch_embeds.get(module)
            grid = self._grids.get(patch_embed) if patch_embed is not None else None
            if grid is not None and grid[0] * grid[1] != logits.shape[-1] - prefix:
                grid = None
        if self.detach:
            logits, output = logits.detach(), output.detach()
        self.records.append(
            AttentionRecord(name=self._module_names[module], logits=logits, output=output,
                            num_prefix_tokens=prefix,
                            grid=tuple(int(g) for g in grid) if grid is not None else None))

    def __enter__(self) -> 'AttentionRecorder':
        if self._active:
            raise RuntimeError('this AttentionRecorder is already active; create a new one '
                               'for nested recording')
        self.records = []
        self._grids = {}
        self._active = True
        try:
            for module in self._targets.values():
                _SINKS.setdefault(module, []).append(self._sink)
            for patch_embed in set(self._patch_embeds.values()):
                self._handles.append(
                    patch_embed.register_forward_hook(self._make_grid_hook(patch_embed)))
        except BaseException:
            self._detach_all()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._detach_all()

    def _detach_all(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module in self._targets.values():
            sinks = _SINKS.get(module)
            if sinks is None:
                continue
            while self._sink in sinks:
                sinks.remove(self._sink)
            if not sinks:
                del _SINKS[module]
        self._grids = {}
        self._active = False

    def by_name(self) -> Dict[str, List[AttentionRecord]]:
        """``{name: [records in call order]}`` for every recorded module (empty list when it
        was not called)."""
        out: Dict[str, List[AttentionRecord]] = {name: [] for name in self._targets}
        for record in self.records:
            out[record.name].append(record)
        return out

    def clear(self) -> None:
        """Drop the records collected so far."""
        self.records = []
