# ODConv README, Faster R-CNN, MobileNetV2 1.0x: 21.13M params, box AP 31.8
_base_ = './_base_/faster_rcnn_sgd_1x.py'

model = dict(
    backbone=dict(arch='mobilenetv2_100',
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/mobilenetv2_100.pth')),
    neck=dict(in_channels=[24, 32, 96, 1280]))  # official MobileNetV2 out_indices (1, 2, 3, 4)
