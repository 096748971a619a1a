"""Plugins that make dynconv backbones usable from other frameworks, one module per framework.

Each module imports its framework and is imported only on request, never by ``import dynconv``:

- :mod:`dynconv.integrations.mmdet`: ``type='DynconvBackbone'`` in mmdetection 3.x configs
  (``configs/mmdet/``; mmdet runs in its own environment, ``requirements/mmdet.txt``).
"""
