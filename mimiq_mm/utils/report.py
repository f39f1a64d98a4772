"""Small helpers to report results: aligned text tables, Markdown tables, atomic JSON files
and a description of the machine a number was measured on.

A table is a list of row dicts plus a list of ``Column`` s saying which key to show, under
which header and how to format it (``None`` / missing values print as ``n/a``)::

    cols = [Column('method', 'method'), Column('bbox_mAP', 'bbox mAP', '{:.3f}')]
    print(text_table(rows, cols))
    Path('results.md').write_text(markdown_table(rows, cols))
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Union

__all__ = ['Column', 'card_slug', 'format_value', 'text_table', 'markdown_table', 'write_json',
           'read_json', 'percent_of', 'machine_info', 'format_seconds']

MISSING = 'n/a'


@dataclasses.dataclass(frozen=True)
class Column:
    """One column: ``key`` of the row dict, ``header`` text, ``fmt`` a format string
    (``'{:.3f}'``) or a callable ``value -> str``; ``align`` is ``'<'`` or ``'>'``."""
    key: str
    header: str
    fmt: Union[str, Callable[[Any], str]] = '{}'
    align: str = '>'

    def __post_init__(self):
        if self.align not in ('<', '>'):
            raise ValueError(f"Column.align must be '<' or '>', got {self.align!r}")


def format_value(value: Any, fmt: Union[str, Callable[[Any], str]] = '{}') -> str:
    """``value`` formatted with ``fmt``; ``None`` and non-finite floats give ``n/a``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if callable(fmt):
        return fmt(value)
    return fmt.format(value)


def _cells(rows: Sequence[Mapping], columns: Sequence[Column]) -> List[List[str]]:
    return [[format_value(row.get(c.key), c.fmt) for c in columns] for row in rows]


def text_table(rows: Sequence[Mapping], columns: Sequence[Column]) -> str:
    """A plain-text table with aligned columns (``|`` separated, a rule under the header)."""
    cells = _cells(rows, columns)
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values, aligns):
        return ' | '.join(f'{v:{a}{w}}' for v, a, w in zip(values, aligns, widths))

    out = [line([c.header for c in columns], ['<'] * len(columns)),
           '-+-'.join('-' * w for w in widths)]
    out += [line(r, [c.align for c in columns]) for r in cells]
    return '\n'.join(out)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table (right-aligned columns get ``---:``)."""
    cells = _cells(rows, columns)
    out = ['| ' + ' | '.join(c.header for c in columns) + ' |',
           '|' + '|'.join('---:' if c.align == '>' else ':---' for c in columns) + '|']
    out += ['| ' + ' | '.join(r) + ' |' for r in cells]
    return '\n'.join(out) + '\n'


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, 'item') and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def write_json(path: Union[str, Path], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (temporary file + rename); numpy/torch
    scalars become numbers, non-finite floats ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(_jsonable(obj), f, indent=1)
            f.write('\n')
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: Union[str, Path], default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when the file is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def percent_of(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """``100 * value / reference``; ``None`` when either is missing or the reference is 0."""
    if value is None or reference is None or not reference > 0:
        return None
    return 100.0 * float(value) / float(reference)


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return MISSING
    seconds = float(seconds)
    if seconds < 60:
        return f'{seconds:.1f} s'
    return f'{int(seconds // 60)} min {seconds % 60:04.1f} s'


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.lower().startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: Optional[str] = None) -> dict:
    """Where a measurement ran: host, CPU model and cores, torch version, accelerator."""
    import torch
    info = dict(hostname=platform.node(), platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__,
                cpu=_cpu_model(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads())
    try:
        info['load_average_1min'] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available() and (device is None or str(device).startswith('cuda')):
        index = torch.cuda.current_device()
        info.update(device='cuda', card=torch.cuda.get_device_name(index),
                    cuda=torch.version.cuda, num_gpus=torch.cuda.device_count())
    else:
        info.update(device='cpu', card='cpu')
    return info


def card_slug(card: str) -> str:
    """File-name-safe form of an accelerator name: 'NVIDIA H100 80GB HBM3' ->
    'nvidia-h100-80gb-hbm3' (results files are named after the card)."""
    return re.sub(r'[^a-z0-9]+', '-', str(card).lower()).strip('-') or 'cpu'
