"""mimiq_mm.engine: hooks, loops and metrics of the MimiQ fine-tuning run (stage 5)."""
from .checkpoint_guard import (AtomicCheckpointHook, CheckpointGuardHook,
                               CheckpointMismatchError, check_checkpoint_matches)
from .config_utils import (apply_mimiq_fields, build_runner, check_run_inputs,
                           close_distributed, exit_after_distributed_run,
                           follow_max_iters, follow_synthetic_root, install_guards,
                           is_mimiq_config, nested_datasets, wrap_teacher_metrics)
from .hooks import (MimiQCalibrationHook, MimiQKeepBestHook, MimiQSynthesisHook,
                    sync_observers_, synthetic_set_complete)
from .loops import MimiQIterBasedTrainLoop
from .metrics import TeacherMetric

__all__ = ['AtomicCheckpointHook', 'CheckpointGuardHook', 'CheckpointMismatchError',
           'check_checkpoint_matches', 'check_run_inputs', 'follow_max_iters', 'install_guards',
           'MimiQCalibrationHook', 'MimiQIterBasedTrainLoop', 'MimiQKeepBestHook',
           'MimiQSynthesisHook',
           'TeacherMetric', 'apply_mimiq_fields', 'build_runner', 'close_distributed',
           'exit_after_distributed_run', 'follow_synthetic_root',
           'is_mimiq_config', 'nested_datasets',
           'sync_observers_', 'synthetic_set_complete', 'wrap_teacher_metrics']
