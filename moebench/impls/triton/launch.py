"""The `triton` layer's launch runtime: tuned and direct launches, TMA descriptors, and the
sections (launches) a tile schedule is run in.

Once a kernel is tuned for a problem, `_launch` goes to it with the remembered config, and
once it is compiled, `_run` calls its compiled launcher straight: triton's Autotuner and
JITFunction.run bind, specialize and key every argument on each call, host time that
decode and small prefill layers are bound by.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from . import configs

# Tuned configs by problem. After a kernel's first call for a problem, the launch goes to the
# kernel with its config and a tuple grid: triton's Autotuner rebuilds its key from every
# argument on each call. configs.clear_tuning() empties it.
_TUNED: dict[tuple, dict] = {}


def _launch(tuner, grid, args, key, fit=None, **constexprs):
    """tuner[grid](*args, **constexprs); returns the config it ran with.

    key: the problem as the tuner keys it (sizes, dtypes). grid(config) -> grid tuple.
    fit(config), when given, does what the configs' pre_hook does for the tuner.
    """
    key = (tuner, *key, *constexprs.values())
    config = _TUNED.get(key)
    if config is None:
        tuner[grid](*args, **constexprs)
        config = _TUNED[key] = tuner.best_config.all_kwargs()
    else:
        if fit is not None:
            fit(config)
        _run(tuner.fn, grid(config), args, {**constexprs, **config})
    return config


# Compiled kernels by (kernel, device, meta, the arguments' specialization): see _run.
_COMPILED: dict[tuple, tuple] = {}


def _descriptor_specialization(arg):
    """A launch argument that is not a tensor: a descriptor's dtype and box, else itself."""
    if isinstance(arg, TensorDescriptor):
        return arg.base.dtype, tuple(arg.block_shape), arg.padding
    return arg


def _no_launch_hooks():
    """Whether no launch hook (a profiler's) is set: triton >= 3.4 keeps them in knobs as
    chains, empty by default; older ones launch differently, so never straight."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return False
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return all(h is None or not getattr(h, "calls", True) for h in hooks)


def _run(fn, grid, args, meta):
    """fn[grid](*args, **meta) for a @triton.jit fn, args all positional and meta its
    constexprs and launch options.

    After the first launch of a specialization, the compiled kernel's launcher is called
    straight with the arguments that triton's JITFunction.run would give it: run binds and
    specializes every argument, builds a cache key and launch metadata on each call, several
    times the launcher's own host time. Not under the interpreter, nor while launch hooks (a
    profiler's) are set. tools/stub_cuda/launch_check.py checks that the launcher gets the
    same arguments both ways.
    """
    if configs.INTERPRET:  # nothing compiled; and no driver to ask for the device
        fn[grid](*args, **meta)
        return
    # What may select another compiled kernel: the device (a kernel's function handle is
    # loaded on one), the meta, a tensor argument's dtype and alignment, a descriptor's
    # dtype and box, any other argument itself (ints first: most arguments are, and the
    # test costs half of the others').
    device = driver.active.get_current_device()
    key = (id(fn), device, *meta.items(), *[
        a if type(a) is int else (a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor)
        else _descriptor_specialization(a) for a in args
    ])  # fmt: skip
    compiled = _COMPILED.get(key)
    if compiled is not None and _no_launch_hooks():
        kernel, constexprs = compiled
        stream = driver.active.get_current_stream(device)
        kernel.run(*grid, *(1,) * (3 - len(grid)), stream, kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *constexprs)  # fmt: skip
        return
    kernel = fn[grid](*args, **meta)
    if getattr(kernel, "packed_metadata", None) is not None:
        # The arguments after the positional ones, in the kernel's order, as run binds them.
        rest = fn.params[len(args) :]
        _COMPILED[key] = kernel, [meta.get(p.name, p.default) for p in rest]


def descriptor(t):
    """A TMA descriptor over the 2-D t (its box set per launch), or None where TMA cannot
    read t (the last dimension strided, an address or row pitch not 16-byte aligned) or
    where it is not worth tuning: fp32, whose exact dots run on FMA units, not wgmma."""
    size = t.element_size()
    aligned = t.stride(0) * size % 16 == 0 and t.data_ptr() % 16 == 0
    if size != 2 or t.stride(1) != 1 or not aligned or t.numel() == 0:
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])


class Section(NamedTuple):
    """One launch of a tile kernel: slots [slot0, slot0 + slots), tiles of block_m rows.

    Its programs loop over the (tile, column block) items of its real tiles, count_2[count]
    of them (read on the device); `programs` gives how many programs there are.
    """

    slot0: int
    slots: int
    block_m: int
    fixed: dict | None  # the big tiles' config by kernel; None: tuned
    count: int  # index in the schedule's count_2: 0 big tiles, 1 the others
    packed: int  # tiles that the S rows would fill at block_m rows each: cdiv(S, block_m)
    floor: int  # programs that the device runs at once (at most)
    sms: int  # programs of a persistent launch: one an SM

    @property
    def loop(self) -> bool:
        """Whether the programs loop (the kernels' LOOP): for short tiles, where the slots
        are more than twice the tiles that S rows make at block_m rows each, so that most
        may stay empty. Taller tiles have fewer slots per row; at most 2x their programs
        stay empty, and looping costs their configs registers."""
        return self.block_m <= configs.LOOP_MAX_M and self.slots > 2 * self.packed

    def programs(self, blocks, persistent=False):
        """A program per slot's `blocks` items; where they loop, as many as S rows make in
        full tiles, if that is fewer (many experts, each a few rows, make more tiles), but
        not fewer than the device runs at once: an empty slot's program is cheap, not free.
        A persistent config (PERSISTENT) takes one program an SM."""
        if persistent:
            return min(self.slots * blocks, self.sms)
        if not self.loop:
            return self.slots * blocks
        return min(self.slots * blocks, max(self.packed * blocks, self.floor))


# Thread blocks an SM holds at most (Hopper); the interpreter uses two programs, so that
# tests run the programs' loops.
_BLOCKS_PER_SM = 32
_RESIDENT: dict[torch.device, tuple[int, int]] = {}


def _resident(device):
    """(programs that `device` runs at once at most, its SMs); (2, 2) under the interpreter."""
    resident = _RESIDENT.get(device)
    if resident is None:
        if configs.INTERPRET:
            resident = (2, 2)
        else:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            resident = (sms * _BLOCKS_PER_SM, sms)
        _RESIDENT[device] = resident
    return resident


def _sections(schedule, block_m, big_m, big, fixed):
    """The launches over a schedule: its first `big` slots (big_m-row tiles, launched with
    the `fixed` configs by kernel), if any, then the others (block_m rows, tuned).

    Compiled kernels are launched for every slot (Section.programs; no host sync). The
    interpreter runs every program in Python, empty ones too, so there each section covers
    only its real tiles (a prefix of the section); on the CPU the host sync that counts
    them is free.
    """
    S, N = schedule.order_S.numel(), schedule.expert_N.numel()
    resident = _resident(schedule.order_S.device)
    cdiv = configs.cdiv
    sections = [Section(big, N - big, block_m, None, 1, cdiv(S, block_m), *resident)]
    if big:
        sections.insert(0, Section(0, big, big_m, fixed, 0, cdiv(S, big_m), *resident))
    if configs.INTERPRET:
        sections = [
            s._replace(slots=int(schedule.end_N[s.slot0 : s.slot0 + s.slots].count_nonzero()))
            for s in sections
        ]
    return [s for s in sections if s.slots]


def _tile_launch(tuner, section, width, args, key, descriptors=None, **constexprs):
    """A tile kernel over one section's items: (tile, BLOCK_N block of width), or (tile,
    N_BLOCKS such blocks) where the config sets N_BLOCKS (down); section.programs of them.

    descriptors: the launch's TMA descriptors by argument name (for tuned sections, and for
    big tiles whose fixed config reads through TMA: without them it reads through pointers).
    """
    cdiv = configs.cdiv
    grid = lambda meta: (
        section.programs(
            cdiv(cdiv(width, meta["BLOCK_N"]), meta.get("N_BLOCKS", 1)),
            meta.get("PERSISTENT", False),
        ),
    )
    if section.fixed is None:
        fit = None
        if descriptors:
            fit = lambda c: configs.fit_descriptors(
                {"BLOCK_M": section.block_m, **c, **descriptors}
            )
        return _launch(
            tuner, grid, args, key, fit, BLOCK_M=section.block_m, LOOP=section.loop, **constexprs
        )
    config = section.fixed[tuner.fn]
    if config.get("TMA"):
        if descriptors:
            configs.fit_descriptors({"BLOCK_M": section.block_m, **config, **descriptors})
        else:  # fp32, unaligned rows, dx's transposed gate_up: the blocks through pointers
            config = {**config, "TMA": False}
    meta = {"BLOCK_M": section.block_m, "LOOP": section.loop, **constexprs, **config}
    _run(tuner.fn, grid(config), args, meta)
    return config
