"""Peers: what a user would otherwise run for the routed experts, measured like moebench's own
layers. Each is a module here whose forwards take the registry's signature (see
moebench.registry) and hand the tensors to the outside library as they are; each forward is
registered under its name in moebench/registry.py PEERS, with the packages it needs, so a peer
whose package, device or kernel is missing is skipped with that reason (moebench.Unavailable)
instead of failing the run.
"""
