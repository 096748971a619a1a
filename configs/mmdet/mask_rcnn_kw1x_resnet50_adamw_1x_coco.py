# KW README, Mask R-CNN (AdamW 1x, multi-scale), ResNet50 + KW (1x): box AP 41.8, mask AP 38.4
_base_ = './_base_/mask_rcnn_adamw_ms_1x.py'

model = dict(
    backbone=dict(conv='kw_1x',
                  # KW_ResNet's default drop_path_rate=0.1, one DropPath(0.1) in every block
                  # (OSVAI/KernelWarehouse detection/mmdet/models/backbones/kw_resnet.py; the config keeps it)
                  conv_options=dict(drop_path_rate=0.1, drop_path_mode='uniform'),
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/kw1x_resnet50.pth')))
