# KernelWarehouse's COCO recipe for ConvNeXt-T (mask_rcnn_adamw_ms_1x.py plus the ConvNeXt changes).
#
# Not reproduced: the official config uses mmcv_custom's layer-wise learning-rate decay (0.95 over 6 layers,
# a ConvNeXt-specific optimizer constructor of the Swin/ConvNeXt detection codebases). Plain mmdet 3.3 has no
# constructor that knows a dynconv ConvNeXt's layer order, so every backbone layer trains at the base rate
# here; expect a small gap to the paper's ConvNeXt rows. Like that constructor (no decay for 1-D parameters
# and biases: mmcv_custom/layer_decay_optimizer_constructor.py), norm, bias and layer-scale (gamma, 1-D in
# timm and in the official backbones/convnext.py) parameters get no weight decay; the recipe base's
# custom_keys are replaced, not merged.
_base_ = './mask_rcnn_adamw_ms_1x.py'

model = dict(
    backbone=dict(
        arch='convnext_tiny',
        conv_options=dict(drop_path_rate=0.4, ls_init_value=1.0),  # ls_init_value: as the official config (the checkpoint overwrites gamma)
        frozen_stages=-1,   # ConvNeXt's detection backbone freezes nothing
        norm_eval=False),   # no BatchNorm in ConvNeXt (its KW attention uses LayerNorm)
    neck=dict(in_channels=[96, 192, 384, 768]))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[9, 11], gamma=0.1),
]

optim_wrapper = dict(
    paramwise_cfg=dict(_delete_=True, norm_decay_mult=0., bias_decay_mult=0.,
                       custom_keys={'.gamma': dict(decay_mult=0.)}))
