"""mimiq_mm.models: the MimiQ teacher/student distiller (stage 4)."""
from .distiller import (DEFAULT_KD_WEIGHTS, MimiQDistiller, build_task_model,
                        load_teacher_weights, unwrap_distiller)

__all__ = ['DEFAULT_KD_WEIGHTS', 'MimiQDistiller', 'build_task_model', 'load_teacher_weights',
           'unwrap_distiller']
