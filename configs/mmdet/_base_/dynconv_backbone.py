# The dynconv backbone every config here starts from (dynconv.integrations.mmdet.DynconvBackbone).
# A recipe base spreads it into model.backbone: model = dict(backbone=dict(_delete_=True, **_base_.dynconv_backbone))
# so the leftover `dynconv_backbone` key in the dumped config is only this template.
custom_imports = dict(imports=['dynconv.integrations.mmdet'], allow_failed_imports=False)

dynconv_backbone = dict(
    type='DynconvBackbone',
    arch='resnet50',                # dynconv.list_archs()
    conv='static',                  # dynconv.list_convs()
    out_indices=(0, 1, 2, 3),
    frozen_stages=1,                # both papers' R50 / MobileNetV2 detection backbones
    norm_eval=True)                 # BatchNorm statistics stay ImageNet's, attention branches included
# Set per config (not here: mmengine will not merge a child's dict into a base's None):
#   conv_options=dict(...)   layer / timm options, e.g. dict(reduction=0.0625) or dict(drop_path_rate=0.4)
#   init_cfg=dict(type='Pretrained', checkpoint='checkpoints/<timm name>.pth')   the ImageNet weights

# Frozen stages' dynamic attention parameters get no gradient under DDP (both official repos set it).
find_unused_parameters = True
