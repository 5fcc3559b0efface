"""Network specs ("25x11x11:relu:max2,...") and the built-in presets -> stage settings and seeded banks."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field

import numpy as np

from rmidl.activation import ACTIVATIONS
from rmidl.errors import OptionError
from rmidl.validate import MODES

__all__ = ["PRESETS", "StageSpec", "parse_spec", "seeded_bank"]

# The paper's network: four CNP stages of 25 kernels 11x11, ReLU, 2x2 max pooling, on 200x200 grayscale
# images. "seed004" is depthwise: its stages then do 220, 44, 6.2 and 0.2 MFLOP per image (each 5-28x
# less than the one before, conv work following the map area), the shape of the paper's Table III
# (CNP1 the bulk of the time, every later stage cheaper), whereas full channel mixing makes CNP2 5x
# dearer than CNP1 (220, 1093, 155, 5.4 MFLOP: 25 x 25 kernels on maps a quarter the size).
# "seed004-full" is the same net with the standard (channel-summing) rule.
# "textures" is for classifying make_textures' set rather than for the timing study: seed004's last stage
# keeps 3x3 of its 16x16 maps (where a texture's statistics are, not which), and logistic regression on
# its features scores ~85% held out; three stages of 24 kernels (7x7, then 5x5 depthwise twice) ending in
# each map's mean (global average pooling: the energy of each filter's rectified response) give 24
# features on which rmidl.train's MLP scores 96-98% held out (net seeds 0-2; scripts/bench_pipeline.py
# --quality checks it), with 38% of seed004's work per image.
PRESETS: dict[str, str] = {
    "seed004": ",".join(["25x11x11:relu:max2:dw"] * 4),
    "seed004-full": ",".join(["25x11x11:relu:max2"] * 4),
    "textures": "24x7x7:relu:max2,24x5x5:relu:max2:dw,24x5x5:relu:gavg:dw",
}

_SIZE = re.compile(r"(\d+)[xX](\d+)(?:[xX](\d+))?")
_POOL = re.compile(r"(max|avg)(\d+)(?:[xX](\d+))?(?:s(\d+)(?:[xX](\d+))?)?")
_GAIN = {"relu": math.sqrt(2.0)}  # He et al. for ReLU; 1 (Glorot/LeCun-like) for the others and None
RECTIFIED = ("relu", "abstanh", "sigmoid")  # activations whose maps are never negative
_WHOLE_MAP = {"nopool": None, "gavg": "global_avg", "gmax": "global_max"}
GRAMMAR = ("KxH[xW] then any of: relu|tanh|abstanh|sigmoid|linear, "
           "max<P>[x<P>][s<S>[x<S>]]|avg...|gavg|gmax|nopool, valid|same|full, dw")


@dataclass
class StageSpec:
    """One stage of a parsed spec: bank size and Stage keyword arguments."""

    kernels: int
    kernel_hw: tuple[int, int]
    options: dict[str, object] = field(default_factory=dict)


def _positive(text: str, where: str) -> int:
    value = int(text)
    if value < 1:
        raise OptionError(f"{where}: sizes must be >= 1, got {value}")
    return value


def _pool_token(match: re.Match[str], where: str) -> dict[str, object]:
    ph = _positive(match[2], where)
    pw = _positive(match[3], where) if match[3] else ph
    options: dict[str, object] = {"pool": match[1], "pool_size": (ph, pw)}
    if match[4]:
        sh = _positive(match[4], where)
        options["pool_stride"] = (sh, _positive(match[5], where) if match[5] else sh)
    return options


def _stage(text: str, where: str) -> StageSpec:
    size, *tokens = text.split(":")
    match = _SIZE.fullmatch(size.strip())
    if match is None:
        raise OptionError(f"{where}: {size!r} is not a bank size KxH[xW] (expected {GRAMMAR})")
    k, kh = _positive(match[1], where), _positive(match[2], where)
    kw = _positive(match[3], where) if match[3] else kh
    options: dict[str, object] = {}
    seen: dict[str, str] = {}
    for raw in tokens:
        values: dict[str, object]
        token = raw.strip().lower()
        pool_match = _POOL.fullmatch(token)
        if token in ACTIVATIONS or token == "linear":
            kind, values = "activation", {"activation": None if token == "linear" else token}
        elif pool_match is not None or token in _WHOLE_MAP:
            kind = "pool"
            values = {"pool": _WHOLE_MAP[token]} if pool_match is None else _pool_token(pool_match, where)
        elif token in MODES:
            kind, values = "mode", {"mode": token}
        elif token in ("dw", "depthwise"):
            kind, values = "depthwise", {"depthwise": True}
        else:
            raise OptionError(f"{where}: unknown token {raw!r} (expected {GRAMMAR})")
        if kind in seen:
            raise OptionError(f"{where}: two {kind} tokens, {seen[kind]!r} and {raw!r}")
        seen[kind] = raw
        options.update(values)
    return StageSpec(k, (kh, kw), options)


def parse_spec(spec: str) -> list[StageSpec]:
    """The stages of a spec such as "25x11x11:relu:max2,25x11x11:relu:max2" (or a preset's name).

    Each stage is a bank size KxH[xW] followed by ':'-separated tokens in any order, each kind at most
    once: an activation (relu, tanh, abstanh, sigmoid; linear for none; default relu), a pooling (max2,
    avg3, max3s2 for window 3 stride 2, max2x3; gavg / gmax for each map's mean / maximum; nopool for
    none; default max2), a padding mode (valid,
    same, full; default valid) and dw for a depthwise stage (default: the standard, channel-summing one).
    """
    if not isinstance(spec, str):
        raise OptionError(f"network spec must be a string, got {type(spec).__name__}")
    text = PRESETS.get(spec.strip().lower(), spec)
    if not text.strip():
        raise OptionError("network spec is empty: give stages such as 25x11x11:relu:max2 or a preset "
                          f"({', '.join(PRESETS)})")
    word = text.strip()
    if re.fullmatch(r"[A-Za-z][\w.-]*", word):  # a name, not a stage: a mistyped preset or a missing file
        close = difflib.get_close_matches(word.lower(), list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"network {spec!r} is not a preset ({', '.join(PRESETS)}), a network file or a "
                          f"spec such as 25x11x11:relu:max2{hint}")
    parts = text.split(",")
    return [_stage(part, f"network spec {spec!r}, stage {i + 1} {part.strip()!r}")
            for i, part in enumerate(parts)]


def seeded_bank(stage: StageSpec, maps_in: int, seed: int, index: int, *,
                reads_rectified: bool = False) -> np.ndarray:
    """Stage `index`'s bank: seeded normal kernels, each with std gain / sqrt(fan-in) around its mean.

    fan-in is kh * kw * C (kh * kw for a depthwise stage); gain is sqrt(2) for ReLU (He) and 1 otherwise.
    Each kernel is zero-sum, plus 1 / fan-in per weight when the stage reads rectified maps (the
    previous stage's relu, abstanh or sigmoid): a local average (DC gain 1) with zero-sum texture on top.
    Why: on positive input a kernel with a negative sum makes a map ReLU zeroes everywhere, and under
    the depthwise rule such a map stays dead in every later stage (plain He scaling left ~85% of
    seed004's features at 0 on a real photo); zero-sum kernels keep every map alive but discard the
    local mean of rectified maps, which is the energy of the responses before (the texture statistic):
    passing it on raised a logistic classifier's held-out accuracy on seed004's features of
    make_textures by 5-16 points. Each stage draws from SeedSequence([seed, index]), so changing one
    stage's size leaves the other stages' banks alone.
    """
    kh, kw = stage.kernel_hw
    depthwise = bool(stage.options.get("depthwise", False))
    channels = 1 if depthwise else maps_in
    fan_in = kh * kw * channels
    activation = stage.options.get("activation", "relu")
    rng = np.random.default_rng([seed, index])
    bank = rng.standard_normal((stage.kernels, kh, kw, channels))
    if fan_in > 1:  # a single 1x1 weight would be zero
        bank -= bank.mean(axis=(1, 2, 3), keepdims=True)
        bank /= bank.std(axis=(1, 2, 3), keepdims=True)
    bank *= _GAIN.get(str(activation), 1.0) / math.sqrt(fan_in)
    if reads_rectified and fan_in > 1:
        bank += 1.0 / fan_in
    return bank.astype(np.float32)
