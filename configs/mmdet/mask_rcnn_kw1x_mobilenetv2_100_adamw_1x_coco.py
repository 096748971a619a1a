# KW README, Mask R-CNN (AdamW 1x, multi-scale), MobileNetV2 1.0x + KW (1x): box AP 36.4, mask AP 33.7
_base_ = './_base_/mask_rcnn_adamw_ms_1x.py'

model = dict(
    backbone=dict(arch='mobilenetv2_100',
                  conv='kw_1x',
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/kw1x_mobilenetv2_100.pth')),
    neck=dict(in_channels=[24, 32, 96, 1280]))  # official MobileNetV2 out_indices (1, 2, 3, 4)
