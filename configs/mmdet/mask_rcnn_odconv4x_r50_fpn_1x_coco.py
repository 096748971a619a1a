# ODConv README, Mask R-CNN, ResNet50 + ODConv (4x): 111.56M params, box AP 40.2, mask AP 36.1
_base_ = './_base_/mask_rcnn_sgd_1x.py'

model = dict(
    backbone=dict(conv='odconv_4x',
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/odconv4x_resnet50.pth')))
