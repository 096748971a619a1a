# ODConv's COCO recipe (OSVAI/ODConv object_detection/configs/odconv): mmdet's standard Faster R-CNN
# R50-FPN 1x (SGD lr 0.02 for 16 images, momentum 0.9, wd 1e-4; 500-iter linear warm-up; 12 epochs,
# steps 8 and 11) with the backbone replaced.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', './dynconv_backbone.py']

model = dict(backbone=dict(_delete_=True, **_base_.dynconv_backbone))
