# ODConv README, Faster R-CNN, ResNet50: 43.80M params, box AP 37.4
_base_ = './_base_/faster_rcnn_sgd_1x.py'

model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnet50.pth')))
