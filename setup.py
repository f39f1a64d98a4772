"""Installable package for mimiq_mm (data-free low-bit quantization for OpenMMLab)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'",
                    (HERE / 'mimiq_mm' / 'version.py').read_text()).group(1)


def _requirements(name):
    """Requirement lines of requirements/<name>.txt (comments and blanks dropped)."""
    lines = (HERE / 'requirements' / f'{name}.txt').read_text().splitlines()
    return [ln.split('#')[0].strip() for ln in lines if ln.split('#')[0].strip()]


# Pinned in requirements/runtime.txt; mmcv is built from its sdist by tools/setup_env.sh.
INSTALL_REQUIRES = _requirements('runtime')

setup(
    name='mimiq_mm',
    version=VERSION,
    description='Data-free low-bit quantization (MimiQ) of Swin/ViT detectors and '
                'segmentors in the OpenMMLab stack',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mimiq_mm', 'mimiq_mm.*']),
    python_requires='>=3.10,<3.13',
    install_requires=INSTALL_REQUIRES,
    extras_require={'tests': _requirements('tests')},
    include_package_data=True,
)
