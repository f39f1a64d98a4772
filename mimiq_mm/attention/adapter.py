"""Attention adapters: the registry, ``adapt_attention_`` / ``restore_attention_`` and the
rule that decides what counts as an attention module.

An adapter is a mixin class (subclass of :class:`AttentionAdapter`) whose ``forward`` is the
explicit attention math of one family of attention modules, written against that family's own
sub-modules and parameters (``qkv``, ``proj``, ``relative_position_bias_table`` ...). Adapting a
module swaps its ``__class__`` for a cached subclass ``(Adapter, OriginalClass)`` and adds two
:class:`~mimiq_mm.quant.modules.MatMul` children, ``qk_matmul`` and ``av_matmul``. The module
keeps its parameters, its ``isinstance`` relations and (except where an adapter documents
otherwise) its ``state_dict`` keys; ``restore_attention_`` swaps the class back.

Adapter lookup is by class: the exact class first, then the classes of its MRO. A subclass that
overrides ``forward`` is not covered by its parent's adapter (its math may differ) and must
register its own.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn


def _matmul_class() -> type:
    # imported lazily: mimiq_mm.quant imports this package (quantize_ adapts attention)
    from mimiq_mm.quant.modules import MatMul
    return MatMul

__all__ = [
    'AttentionAdapter', 'UnsupportedAttentionError', 'register_adapter', 'get_adapter',
    'is_adapted', 'is_attention_like', 'find_attention_modules', 'adapt_attention_',
    'restore_attention_'
]

# Adapter registry. Keys are classes, or 'module.QualName' strings for library classes that
# are resolved by name so that registering them does not import the library.
_ADAPTERS: Dict[Union[type, str], Type['AttentionAdapter']] = {}
# Cache of adapted classes, (adapter, original class) -> subclass of both.
_ADAPTED_CLASSES: Dict[Tuple[type, type], type] = {}
# Active recording callbacks, module -> list of callables. Empty unless a recorder is active;
# adapted forwards only test its truthiness when nothing records.
_SINKS: Dict[nn.Module, List[Callable]] = {}

# Names of direct children / parameters that mark a q/k/v input projection (see
# is_attention_like). Tuples mean "all of these".
_QKV_PROJECTION_NAMES: Tuple[Union[str, Tuple[str, ...]], ...] = (
    'qkv', 'to_qkv', 'qkv_proj', 'in_proj', 'in_proj_weight', 'Wqkv', ('q', 'kv'),
    ('q', 'k', 'v'), ('q_proj', 'k_proj', 'v_proj'), ('query', 'key', 'value'),
    ('to_q', 'to_k', 'to_v'), ('to_q', 'to_kv'))


class UnsupportedAttentionError(TypeError):
    """An attention module without a (working) adapter, or no attention where one was required."""


def _qualname(cls: type) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


class AttentionAdapter:
    """Base class of attention adapters (a mixin: it never stands alone).

    A subclass defines ``forward`` with the same signature as the adapted class, computing the
    attention explicitly from the module's own sub-modules and parameters, with

    - ``logits = self.qk_matmul(q * scale, k.transpose(-2, -1))`` plus any relative-position bias
      and additive mask, shape ``(B', H, Nq, Nk)``;
    - ``out = self.av_matmul(probs, v)``, shape ``(B', H, Nq, d)``;
    - ``self.record_attention(logits, out, grid=...)`` once per call.

    Optional hooks, all no-ops here: ``adapter_check(module)`` (classmethod; raise
    :class:`UnsupportedAttentionError` for configurations the adapter cannot compute),
    ``adapter_setup()`` (after the class swap; e.g. expose a packed projection as an
    ``nn.Linear``) and ``adapter_teardown()`` (undo ``adapter_setup``).

    ``num_prefix_tokens`` of the records is taken from ``adapt_attention_`` (argument or
    inference); ``grid`` is what the adapter passes, else the patch grid seen by the recorder.
    """

    #: set on adapted classes: the class the module had before adaptation
    _mimiq_original_class: Optional[type] = None

    @classmethod
    def adapter_check(cls, module: nn.Module) -> None:
        """Raise UnsupportedAttentionError when ``module`` uses options this adapter lacks."""

    def adapter_setup(self) -> None:
        """Called once, after the class swap and after ``qk_matmul``/``av_matmul`` exist."""

    def adapter_teardown(self) -> None:
        """Called once by restore_attention_, before the class is swapped back."""

    def _mimiq_restore_blockers(self) -> List[str]:
        """Why restore_attention_ cannot undo the adaptation now (empty list: it can)."""
        return [
            f'{child} is a {type(getattr(self, child, None)).__name__}, not a float MatMul'
            for child in ('qk_matmul', 'av_matmul')
            if type(getattr(self, child, None)) is not _matmul_class()
        ]

    def __reduce_ex__(self, protocol):
        # adapted classes are created at run time and share the original's qualified name:
        # pickle them as "adapt this original class with this adapter" plus the state
        cls = type(self)
        if cls._mimiq_original_class is None:
            return super().__reduce_ex__(protocol)
        return (_rebuild_adapted, (cls._mimiq_adapter, cls._mimiq_original_class),
                self.__getstate__())

    def record_attention(self,
                         logits: torch.Tensor,
                         output: torch.Tensor,
                         grid: Optional[Tuple[int, int]] = None) -> None:
        """Hand one call's logits ``(B', H, Nq, Nk)`` and output ``(B', H, Nq, d)`` to the active
        recorders of this module. Costs one dict truth test when nothing records."""
        if not _SINKS:
            return
        sinks = _SINKS.get(self)  # type: ignore[call-overload]
        if sinks:
            for sink in tuple(sinks):
                sink(self, logits, output, grid)


def register_adapter(*targets: Union[type, str]) -> Callable[[type], type]:
    """Class decorator registering an :class:`AttentionAdapter` for attention classes.

    ``targets`` are attention classes, or their ``'module.QualName'`` strings (resolved when a
    module of that class is met, so the library need not be imported)::

        @register_adapter(MyAttention)
        class MyAttentionAdapter(AttentionAdapter):
            def forward(self, x): ...

    Registering a class again replaces its adapter.
    """
    if not targets:
        raise TypeError('register_adapter needs at least one attention class, '
                        'e.g. @register_adapter(MyAttention)')
    for target in targets:
        if not isinstance(target, (type, str)):
            raise TypeError(f'register_adapter expects attention classes or "module.QualName" '
                            f'strings, got {target!r}')

    def decorator(adapter: type) -> type:
        if not (isinstance(adapter, type) and issubclass(adapter, AttentionAdapter)):
            raise TypeError(f'{adapter!r} must subclass mimiq_mm.attention.AttentionAdapter')
        if issubclass(adapter, nn.Module):
            raise TypeError(f'{adapter.__name__} must not subclass nn.Module: an adapter is a '
                            f'mixin, write `class {adapter.__name__}(AttentionAdapter)`')
        if 'forward' not in vars(adapter) and not any(
                'forward' in vars(base) for base in adapter.__mro__[1:]
                if issubclass(base, AttentionAdapter) and base is not AttentionAdapter):
            raise TypeError(f'{adapter.__name__} must define forward()')
        for target in targets:
            _ADAPTERS[target] = adapter
        return adapter

    return decorator


def _lookup(cls: type) -> Optional[type]:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS.get(_qualname(cls))
    return adapter


def get_adapter(cls: type) -> Optional[Type[AttentionAdapter]]:
    """The adapter registered for ``cls`` (exact class, then its MRO), or None.

    A registered base class does not cover a subclass that overrides ``forward``.
    """
    if getattr(cls, '_mimiq_original_class', None) is not None:
        cls = cls._mimiq_original_class
    for base in cls.__mro__:
        adapter = _lookup(base)
        if adapter is not None:
            if base is not cls and getattr(cls, 'forward', None) is not getattr(
                    base, 'forward', None):
                return None  # the subclass computes something else
            return adapter
    return None


def is_adapted(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module adapted by adapt_attention_."""
    return isinstance(module, AttentionAdapter) and \
        type(module)._mimiq_original_class is not None


def _has_qkv_projection(module: nn.Module) -> bool:
    names = set(module._modules) | set(k for k, v in module._parameters.items() if v is not None)
    for entry in _QKV_PROJECTION_NAMES:
        wanted = (entry, ) if isinstance(entry, str) else entry
        if all(name in names for name in wanted):
            return True
    return False


#: attribute names under which attention implementations keep their head count
_HEAD_COUNT_NAMES = ('num_heads', 'num_attention_heads', 'n_heads', 'n_head', 'heads', 'nhead')


def is_attention_like(module: nn.Module) -> bool:
    """The rule deciding what adapt_attention_ must handle. A module is attention-like when

    1. it is an ``nn.MultiheadAttention`` (any subclass), or
    2. an adapter is registered for its class or one of its bases, or
    3. it has an integer head count (an attribute named ``num_heads``, ``num_attention_heads``,
       ``n_heads``, ``n_head``, ``heads`` or ``nhead``) AND a direct child module or parameter
       that is a q/k/v input projection: one of ``qkv``, ``to_qkv``, ``qkv_proj``, ``in_proj``,
       ``in_proj_weight``, ``Wqkv``, or all of ``q``+``kv``, ``q``+``k``+``v``,
       ``q_proj``+``k_proj``+``v_proj``, ``query``+``key``+``value``, ``to_q``+``to_k``+``to_v``,
       ``to_q``+``to_kv``.

    Wrappers that only hold an attention module (mmcv ``MultiheadAttention``, mmdet
    ``ShiftWindowMSA``, transformer blocks) are not attention-like: their inner module is.
    """
    if isinstance(module, nn.MultiheadAttention) or is_adapted(module):
        return True
    cls = type(module)
    if any(_lookup(base) is not None for base in cls.__mro__):
        return True
    has_heads = any(isinstance(getattr(module, attr, None), int)
                    and not isinstance(getattr(module, attr), bool) for attr in _HEAD_COUNT_NAMES)
    return has_heads and _has_qkv_projection(module)


def find_attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """All attention-like modules of ``model`` (see :func:`is_attention_like`), adapted or not,
    supported or not, as ``{fully-qualified name: module}`` in ``named_modules`` order.
    MatMul children of adapted modules are not listed."""
    return {name: m for name, m in model.named_modules() if is_attention_like(m)}


def _unsupported_message(items: Sequence[Tuple[str, nn.Module, str]]) -> str:
    lines = ['adapt_attention_ found attention modules it cannot adapt:']
    for name, module, why in items:
        lines.append(f'  {name or "<root>"}: {_qualname(type(module))} ({why})')
    cls = type(items[0][1])
    lines.append(
        'Register an adapter that computes this attention explicitly (see '
        'docs/custom_backbone.md):\n'
        '    from mimiq_mm.attention import AttentionAdapter, register_adapter\n'
        f'    @register_adapter({cls.__name__})\n'
        f'    class {cls.__name__}Adapter(AttentionAdapter):\n'
        '        def forward(self, x):  # same signature as the original forward\n'
        '            ...  # logits = self.qk_matmul(q * scale, k.transpose(-2, -1)); '
        'out = self.av_matmul(probs, v)\n'
        '            self.record_attention(logits, out)\n'
        '            ...')
    return '\n'.join(lines)


def _adapted_class(adapter: type, original: type) -> type:
    key = (adapter, original)
    cls = _ADAPTED_CLASSES.get(key)
    if cls is None:
        cls = type(original.__name__, (adapter, original), {
            '_mimiq_original_class': original,
            '_mimiq_adapter': adapter,
            '__module__': original.__module__,
            '__qualname__': original.__qualname__,
            '__doc__': f'{original.__qualname__} adapted by {adapter.__qualname__} '
                       f'(mimiq_mm.attention): explicit forward through qk_matmul/av_matmul.',
        })
        _ADAPTED_CLASSES[key] = cls
    return cls


def _rebuild_adapted(adapter: type, original: type) -> nn.Module:
    """Unpickling helper: an empty instance of the adapted class (state is set afterwards)."""
    cls = _adapted_class(adapter, original)
    return cls.__new__(cls)


def _infer_num_prefix_tokens(model: nn.Module, name: str) -> int:
    """Class/register tokens in front of the sequence seen by attention module ``name``:
    the nearest ancestor (within ``model``, the module itself excluded) with an int attribute
    ``num_prefix_tokens`` (timm ViTs), else with a ``cls_token`` parameter and a bool
    ``with_cls_token`` (mmseg ``VisionTransformer`` drops the class token before its layers
    when ``with_cls_token=False``), else 0."""
    parts = name.split('.') if name else []
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = model.get_submodule('.'.join(parts[:depth]))
        value = getattr(ancestor, 'num_prefix_tokens', None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        with_cls = getattr(ancestor, 'with_cls_token', None)
        if isinstance(getattr(ancestor, 'cls_token', None), nn.Parameter) and \
                isinstance(with_cls, bool):
            return int(with_cls)
    return 0


def adapt_attention_(module: nn.Module,
                     *,
                     num_prefix_tokens: Optional[int] = None,
                     require: bool = False) -> nn.Module:
    """Adapt every attention module inside ``module`` (itself included), in place.

    Each supported attention module then computes the same function explicitly, with
    q·kᵀ and attn·v routed through its new ``qk_matmul`` / ``av_matmul`` children and reported
    to active :class:`~mimiq_mm.attention.AttentionRecorder` s. Idempotent.

    Args:
        module: a model or sub-module.
        num_prefix_tokens: class/register tokens at the front of the token sequence of every
            attention module found. None infers it per module (see ``_infer_num_prefix_tokens``:
            timm ``model.num_prefix_tokens``, mmseg ViT ``with_cls_token``; else 0).
        require: raise UnsupportedAttentionError if ``module`` contains no attention at all
            (use it where the caller knows the module is a transformer).

    Raises:
        UnsupportedAttentionError: an attention-like module (see :func:`is_attention_like`) has
            no adapter or uses options its adapter does not support. Nothing is modified then.
    """
    if num_prefix_tokens is not None and (not isinstance(num_prefix_tokens, int)
                                          or isinstance(num_prefix_tokens, bool)
                                          or num_prefix_tokens < 0):
        raise ValueError(f'num_prefix_tokens must be a non-negative int or None, '
                         f'got {num_prefix_tokens!r}')
    todo, done, unsupported = [], [], []
    for name, m in find_attention_modules(module).items():
        if is_adapted(m):
            done.append((name, m))
            continue
        adapter = get_adapter(type(m))
        if adapter is None:
            why = 'no adapter registered'
            if any(_lookup(base) is not None for base in type(m).__mro__[1:]):
                why = 'subclass overrides forward(); its base class adapter does not apply'
            unsupported.append((name, m, why))
            continue
        try:
            adapter.adapter_check(m)
        except UnsupportedAttentionError as err:
            unsupported.append((name, m, str(err)))
            continue
        for child in ('qk_matmul', 'av_matmul'):
            if hasattr(m, child):
                unsupported.append((name, m, f'already has an attribute {child!r}'))
        todo.append((name, m, adapter))
    if unsupported:
        raise UnsupportedAttentionError(_unsupported_message(unsupported))
    if require and not todo and not done:
        raise UnsupportedAttentionError(
            f'adapt_attention_(require=True) found no attention module in '
            f'{_qualname(type(module))}. If it is a transformer, its attention class is not '
            f'recognised: register an adapter with @register_adapter(YourAttentionClass) '
            f'(see docs/custom_backbone.md).')
    for name, m, adapter in todo:
        prefix = num_prefix_tokens
        if prefix is None:
            prefix = _infer_num_prefix_tokens(module, name)
        m.__class__ = _adapted_class(adapter, type(m))
        m.qk_matmul = _matmul_class()()
        m.av_matmul = _matmul_class()()
        m._mimiq_num_prefix_tokens = prefix
        m.adapter_setup()
    if num_prefix_tokens is not None:
        for _, m in done:
            m._mimiq_num_prefix_tokens = num_prefix_tokens
    return module


def restore_attention_(module: nn.Module) -> nn.Module:
    """Undo :func:`adapt_attention_` on every adapted attention module inside ``module``:
    original class, no ``qk_matmul``/``av_matmul`` children, original parameters and
    ``state_dict`` keys. Quantized modules must be dequantized first (``dequantize_``)."""
    adapted = [(name, m) for name, m in module.named_modules() if is_adapted(m)]
    blockers = [f'{name or "<root>"}: {why}' for name, m in adapted
                for why in m._mimiq_restore_blockers()]
    if blockers:
        raise RuntimeError('restore_attention_ cannot undo the adaptation of: ' +
                           '; '.join(blockers) +
                           '. Run mimiq_mm.quant.dequantize_(model) first, then '
                           'restore_attention_(model).')
    for _, m in adapted:
        m.adapter_teardown()
        del m.qk_matmul
        del m.av_matmul
        m.__dict__.pop('_mimiq_num_prefix_tokens', None)
        m.__class__ = type(m)._mimiq_original_class
    return module
