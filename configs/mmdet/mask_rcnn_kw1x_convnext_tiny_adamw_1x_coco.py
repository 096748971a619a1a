# KW README, Mask R-CNN (AdamW 1x, multi-scale), ConvNeXt-Tiny + KW: box AP 44.7, mask AP 40.6
# (the README labels this row "KW (4x)" but links the kw1x config; the paper's ConvNeXt model is KW 1x)
_base_ = './_base_/mask_rcnn_adamw_ms_1x_convnext.py'

model = dict(
    backbone=dict(conv='kw_1x',
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/kw1x_convnext_tiny.pth')))

# The official KW ConvNeXt keeps its layer scale as a [1, C, 1, 1] tensor (detection/mmdet/models/backbones/
# kw_convnext.py), which the layer-decay constructor's "no decay for 1-D" rule does not spare: decayed.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'.gamma': dict(decay_mult=1.)}))
