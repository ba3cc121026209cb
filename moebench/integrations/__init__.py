"""Integrations: moebench's own layers inside other libraries' models, so a real model runs
on them (`moebench.integrations.hf.register()` for transformers' MoE models). Each is a module
here, imported only by whoever uses it: moebench itself needs none of those libraries.
"""
