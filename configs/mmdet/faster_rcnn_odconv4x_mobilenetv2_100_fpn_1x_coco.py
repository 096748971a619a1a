# ODConv README, Faster R-CNN, MobileNetV2 1.0x + ODConv (4x): 29.14M params, box AP 35.5
_base_ = './_base_/faster_rcnn_sgd_1x.py'

model = dict(
    backbone=dict(arch='mobilenetv2_100',
                  conv='odconv_4x',
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/odconv4x_mobilenetv2_100.pth')),
    neck=dict(in_channels=[24, 32, 96, 1280]))  # official MobileNetV2 out_indices (1, 2, 3, 4)
