"""moe_ep: expert-parallel Mixture-of-Experts for PyTorch.

``moe_ep.comm``: DeepEP-compatible dispatch/combine (``Buffer``). ``moe_ep.layers``: drop-in MoE
modules built on it. ``moe_ep.config``: YAML parallelism configs.
"""
__version__ = "0.1.0"
