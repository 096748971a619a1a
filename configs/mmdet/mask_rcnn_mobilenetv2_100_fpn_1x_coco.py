# ODConv README, Mask R-CNN, MobileNetV2 1.0x: 23.78M params, box AP 32.4, mask AP 29.8
_base_ = './_base_/mask_rcnn_sgd_1x.py'

model = dict(
    backbone=dict(arch='mobilenetv2_100',
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/mobilenetv2_100.pth')),
    neck=dict(in_channels=[24, 32, 96, 1280]))  # official MobileNetV2 out_indices (1, 2, 3, 4)
