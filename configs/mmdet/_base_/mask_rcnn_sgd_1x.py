# ODConv's COCO recipe for Mask R-CNN: mmdet's standard Mask R-CNN R50-FPN 1x (see faster_rcnn_sgd_1x.py).
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', './dynconv_backbone.py']

model = dict(backbone=dict(_delete_=True, **_base_.dynconv_backbone))
