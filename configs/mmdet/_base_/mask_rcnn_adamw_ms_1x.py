# KernelWarehouse's COCO recipe (OSVAI/KernelWarehouse detection/configs/kernelwarehouse/{resnet50,mobilenetv2},
# written for the mmdet 2.11 SwinTransformer/Swin-Transformer-Object-Detection codebase), in mmdet 3.x terms:
# Mask R-CNN R50-FPN, AdamW lr 1e-4 (16 images), betas (0.9, 0.999), wd 0.05, 12 epochs, steps 8 and 11
# (mmdet's 500-iter linear warm-up kept), and DETR-style multi-scale / crop augmentation. The papers'
# baselines were retrained with this same recipe.
#
# Weight decay: the official custom_keys, unchanged. mmcv (v1.3 DefaultOptimizerConstructor) and mmengine
# match a key as a substring of the parameter's full name, so 'norm' spares only the KW attention's norm1;
# BatchNorms (bn1, ...) and biases are decayed (norm_decay_mult and bias_decay_mult stay 1), as they were in
# the official runs.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './dynconv_backbone.py']

model = dict(backbone=dict(_delete_=True, **_base_.dynconv_backbone))

# short side 480..800 in steps of 32, long side at most 1333
detr_scales = [(1333, short) for short in range(480, 801, 32)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=_base_.backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            # either one multi-scale resize ...
            [dict(type='RandomChoiceResize', scales=detr_scales, keep_ratio=True)],
            # ... or resize to a short side of 400/500/600, crop 384..600, then the multi-scale resize
            [
                dict(type='RandomChoiceResize', scales=[(1333, 400), (1333, 500), (1333, 600)], keep_ratio=True),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
                dict(type='RandomChoiceResize', scales=detr_scales, keep_ratio=True),
            ],
        ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'absolute_pos_embed': dict(decay_mult=0.),
                                    'relative_position_bias_table': dict(decay_mult=0.),
                                    'norm': dict(decay_mult=0.)}))
