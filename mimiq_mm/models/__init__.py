"""mimiq_mm.models: the MimiQ teacher/student distiller (stage 4) and the real pretrained
backbone (DINOv2 ViT-S/14 + simple pyramid) registered for mmdet and mmseg."""
from .dinov2 import DINOv2Pyramid
from .distiller import (DEFAULT_KD_WEIGHTS, MimiQDistiller, build_task_model,
                        load_teacher_weights, unwrap_distiller)

__all__ = ['DEFAULT_KD_WEIGHTS', 'DINOv2Pyramid', 'MimiQDistiller', 'build_task_model',
           'load_teacher_weights', 'unwrap_distiller']
