# ODConv README, Mask R-CNN, MobileNetV2 1.0x + ODConv (4x): 31.80M params, box AP 36.0, mask AP 33.0
_base_ = './_base_/mask_rcnn_sgd_1x.py'

model = dict(
    backbone=dict(arch='mobilenetv2_100',
                  conv='odconv_4x',
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/odconv4x_mobilenetv2_100.pth')),
    neck=dict(in_channels=[24, 32, 96, 1280]))  # official MobileNetV2 out_indices (1, 2, 3, 4)
