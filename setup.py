"""Installable package for mimiq_mm (data-free low-bit quantization for OpenMMLab)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'",
                    (HERE / 'mimiq_mm' / 'version.py').read_text()).group(1)

# Pinned: mmdet 3.3.0 / mmseg 1.2.2 need mmcv >=2.0.0rc4,<2.2.0 with compiled ops; mmcv is
# built from its sdist by tools/setup_env.sh (no wheel exists for current torch).
INSTALL_REQUIRES = [
    'mmengine==0.10.7',
    'mmcv==2.1.0',
    'mmdet==3.3.0',
    'mmsegmentation==1.2.2',
    'timm>=1.0,<2',
    'pycocotools>=2.0.9',
    'ftfy',
    'regex',
    'setuptools>=64,<81',  # mmengine and mmcv import pkg_resources (gone in 81)
    'numpy',
    'matplotlib',
    'Pillow',
    'tqdm',
]

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
    extras_require={'tests': ['pytest>=7', 'pytest-xdist>=3']},
    include_package_data=True,
)
