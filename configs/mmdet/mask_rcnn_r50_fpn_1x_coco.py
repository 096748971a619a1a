# ODConv README, Mask R-CNN, ResNet50: 46.45M params, box AP 38.2, mask AP 34.6
_base_ = './_base_/mask_rcnn_sgd_1x.py'

model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnet50.pth')))
