# Baseline: PSAQ-ViT's label-free patch-similarity entropy (on the Swin backbone's four output
# levels), same optimiser/augmentation/TV as MimiQ.
_base_ = ['./mimiq_maskrcnn_swin-t_coco.py']

synthesis = dict(method='psaq', w_psaq=1.0, psaq_bins=64, psaq_bandwidth=0.05,
                 psaq_max_pairs=4096)
