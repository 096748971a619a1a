# KW README, Mask R-CNN (AdamW 1x, multi-scale), ConvNeXt-Tiny: box AP 43.4, mask AP 39.7
_base_ = './_base_/mask_rcnn_adamw_ms_1x_convnext.py'

model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='checkpoints/convnext_tiny.pth')))
