# KW README, Mask R-CNN (AdamW 1x, multi-scale), ResNet50: box AP 39.6, mask AP 36.4
_base_ = './_base_/mask_rcnn_adamw_ms_1x.py'

model = dict(
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnet50.pth')))
