"""Train loop of the MimiQ fine-tuning run."""
from typing import Dict, Union

from mmengine.runner import IterBasedTrainLoop
from torch.utils.data import DataLoader

from mimiq_mm.registry import LOOPS


@LOOPS.register_module()
class MimiQIterBasedTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that first calls the hook point
    ``before_build_train_dataloader(runner, dataloader_cfg=...)`` so that
    :class:`MimiQSynthesisHook` can create a missing synthetic set before the dataset is
    built (mmengine builds the dataloader before ``before_run``)."""

    def __init__(self, runner, dataloader: Union[DataLoader, Dict], *args, **kwargs):
        runner.call_hook('before_build_train_dataloader',
                         dataloader_cfg=dataloader if isinstance(dataloader, dict) else None)
        super().__init__(runner, dataloader, *args, **kwargs)
