"""mimiq_mm.engine: hooks, loops and metrics of the MimiQ fine-tuning run (stage 5)."""
from .config_utils import (apply_mimiq_fields, build_runner, close_distributed,
                           exit_after_distributed_run, follow_synthetic_root,
                           is_mimiq_config, nested_datasets, wrap_teacher_metrics)
from .hooks import (MimiQCalibrationHook, MimiQKeepBestHook, MimiQSynthesisHook,
                    sync_observers_,
                    synthetic_set_complete)
from .loops import MimiQIterBasedTrainLoop
from .metrics import TeacherMetric

__all__ = ['MimiQCalibrationHook', 'MimiQIterBasedTrainLoop', 'MimiQKeepBestHook', 'MimiQSynthesisHook',
           'TeacherMetric', 'apply_mimiq_fields', 'build_runner', 'close_distributed',
           'exit_after_distributed_run', 'follow_synthetic_root',
           'is_mimiq_config', 'nested_datasets',
           'sync_observers_', 'synthetic_set_complete', 'wrap_teacher_metrics']
