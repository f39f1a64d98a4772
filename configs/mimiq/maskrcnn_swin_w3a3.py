# MimiQ W3/A3 Mask R-CNN Swin-T: the W4/A4 recipe with other bit widths.
_base_ = ['./maskrcnn_swin_w4a4.py']
quant_cfg = dict(weight=dict(bits=3), act=dict(bits=3), attn_prob=dict(bits=3))
model = dict(quant_cfg=quant_cfg)
