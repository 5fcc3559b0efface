"""Where features came from (the network and the images it saw), so a model refuses features of another kind.

`rmidl features` records it in its file (the network's fingerprint and settings, the images' shape and
preprocessing in the stats); `rmidl train` / `rmidl.train(feats)` keep it in the model; `rmidl predict`
and `MLP.predict(feats)` compare. Two feature spaces are the same when the network computes the same
(its fingerprint: banks and stage settings, whatever the spec's text) on images of the same shape
(height, width, channels). How the images came to that shape (--resize, --crop, --gray) is recorded and
shown, not compared: test images already 200x200 meet a model trained on images resized to 200x200.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rmidl.errors import InputError

__all__ = ["PREPROCESSING", "Provenance"]

PREPROCESSING = ("resize", "crop", "gray")
"""The dataset settings that change pixels (skip_bad only drops images)."""


@dataclass(frozen=True)
class Provenance:
    """The network that computed a feature set (`fingerprint`, `spec` text, input `channels`) and the
    images it computed them on (`image_shape` (H, W) or (H, W, C), `preprocessing`: resize, crop, gray)."""

    fingerprint: str
    image_shape: tuple[int, ...]
    spec: str | None = None
    channels: int | None = None
    preprocessing: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of_features(cls, network: Mapping[str, Any], stats: Mapping[str, Any],
                    where: str = "features") -> Provenance | None:
        """From a FeatureSet's `network` and `stats` (what `rmidl features` writes); None when they do not
        say (a feature set built by hand)."""
        if not network.get("fingerprint") or "image_shape" not in stats:
            return None
        preprocessing = stats.get("preprocessing") or {}
        return cls.from_dict({"fingerprint": network["fingerprint"], "spec": network.get("spec"),
                              "channels": network.get("channels"), "image_shape": stats["image_shape"],
                              "preprocessing": preprocessing}, where)

    @classmethod
    def from_dict(cls, data: object, where: str = "provenance") -> Provenance:
        """Parse to_dict()'s output (e.g. from a file); anything else is one InputError naming `where`."""
        if isinstance(data, Provenance):
            return data
        if not isinstance(data, Mapping) or not {"fingerprint", "image_shape"} <= set(data):
            raise InputError(f"{where}: features provenance needs a fingerprint and an image_shape, got "
                             f"{data!r:.120}")
        fingerprint, shape = data["fingerprint"], data["image_shape"]
        spec, channels = data.get("spec"), data.get("channels")
        preprocessing = data.get("preprocessing") or {}
        valid = (isinstance(fingerprint, str) and fingerprint
                 and isinstance(shape, (list, tuple)) and len(shape) in (2, 3)
                 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
                 and (spec is None or isinstance(spec, str))
                 and (channels is None or (isinstance(channels, int) and channels > 0))
                 and isinstance(preprocessing, Mapping))
        if not valid:
            raise InputError(f"{where}: malformed features provenance {dict(data)!r:.200}")
        kept = {key: preprocessing[key] for key in PREPROCESSING if preprocessing.get(key) is not None}
        return cls(fingerprint, tuple(shape), spec or None, channels, kept)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (what a model file keeps in its settings)."""
        return {"fingerprint": self.fingerprint, "spec": self.spec, "channels": self.channels,
                "image_shape": list(self.image_shape), "preprocessing": dict(self.preprocessing)}

    def same_features(self, other: Provenance) -> bool:
        """True when both describe one feature space: the same computation on images of the same shape."""
        return self.fingerprint == other.fingerprint and self.image_shape == other.image_shape

    def describe(self) -> str:
        """"network 'textures' (fingerprint 927b1518...) on 48x48 gray images (resize 50)", for messages."""
        network = f"network {self.spec!r} " if self.spec else "network "
        height, width, *rest = self.image_shape
        kind = "gray" if not rest or rest[0] == 1 else "RGB" if rest[0] == 3 else f"{rest[0]}-channel"
        done = ", ".join(_setting(key, value) for key, value in self.preprocessing.items())
        return (f"{network}(fingerprint {self.fingerprint[:12]}...) on {height}x{width} {kind} images"
                + (f" ({done})" if done else ""))

    def check(self, features: Provenance | None, where: str) -> None:
        """Refuse features of another feature space than these (the model's) in one InputError line;
        features that do not say where they came from pass (a user's own X)."""
        if features is not None and not self.same_features(features):
            raise InputError(f"{where} holds features of {features.describe()}, but the model was trained "
                             f"on features of {self.describe()}")


def _setting(key: str, value: object) -> str:
    """One preprocessing setting as words: "resized to 50", "cropped to 40x40", "made gray"."""
    if key == "gray":
        return "made gray" if value else "made RGB"
    shown = "x".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    return f"{'resized' if key == 'resize' else 'cropped'} to {shown}"
