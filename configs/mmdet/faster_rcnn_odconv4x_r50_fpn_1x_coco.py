# ODConv README, Faster R-CNN, ResNet50 + ODConv (4x): 108.91M params, box AP 39.4
_base_ = './_base_/faster_rcnn_sgd_1x.py'

model = dict(
    backbone=dict(conv='odconv_4x',
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/odconv4x_resnet50.pth')))
