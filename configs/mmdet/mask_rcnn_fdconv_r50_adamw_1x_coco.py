# FDConv README, Mask R-CNN, ResNet50 + FDConv: +3.6M params, box AP 42.4, mask AP 38.6
# (Linwei-Chen/FDConv FDConv_detection/configs/mask_rcnn/mask_rcnn_r50_fpn_1x_coco_adamw_FDConv.py): the
# KernelWarehouse AdamW multi-scale recipe with the learning rate stepped at epochs 10 and 11, fp16 with a
# dynamic loss scale, training images padded to a multiple of 64 (the official test pipeline pads to 32;
# mmdet 3's data preprocessor pads both alike). The custom_keys 'norm' (decay_mult 0) spares KSM_Local.norm.
# The backbone starts from torchvision's static ImageNet ResNet50, converted when the weights are loaded
# (static=True), and frozen stage 1 keeps its KSM / FBM branches training (need_grad_list=['KSM', 'FBM']).
_base_ = './_base_/mask_rcnn_adamw_ms_1x.py'

model = dict(
    data_preprocessor=dict(pad_size_divisor=64),
    backbone=dict(conv='fdconv', frozen_trainable=['KSM', 'FBM'],
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnet50-0676ba61.pth', static=True)))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[10, 11], gamma=0.1),
]
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
