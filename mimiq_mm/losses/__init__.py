"""mimiq_mm.losses: L_sim (inter-head attention similarity), TV prior, HSAD, task KD."""
from .attention_similarity import attention_ssim_matrix, inter_head_similarity_loss
from .hsad import hsad_loss
from .tv import total_variation_l2

__all__ = ['attention_ssim_matrix', 'inter_head_similarity_loss', 'hsad_loss',
           'total_variation_l2']
