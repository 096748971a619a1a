# FDConv README, Faster R-CNN, ResNet50 + FDConv: +3.6M params, box AP 39.4
# (Linwei-Chen/FDConv FDConv_detection/configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco_FDConv.py: mmdet's SGD 1x,
# 8 images on each of 2 GPUs, images padded to a multiple of 64 in training and test).
# The backbone starts from torchvision's static ImageNet ResNet50, converted when the weights are loaded
# (static=True: dynconv.pretrained.init_from_static, FDConv's kernels into their Fourier coefficients, as the
# official tools/convert_to_fdconv.py), and frozen stage 1 keeps its KSM / FBM branches training
# (the official need_grad_list=['KSM', 'FBM']).
_base_ = './_base_/faster_rcnn_sgd_1x.py'

model = dict(
    data_preprocessor=dict(pad_size_divisor=64),
    backbone=dict(conv='fdconv', frozen_trainable=['KSM', 'FBM'],
                  init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnet50-0676ba61.pth', static=True)))
