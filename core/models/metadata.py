"""Age, sex and body site as model inputs: their encoding (one source of truth for the site list) and the
fusion head of a model that takes them.

**Encoding.** A row of :attr:`MetadataEncoding.width` numbers, in three fields:

- age: ``age / age_scale`` and an "unknown" indicator (the scaled value is 0 when unknown);
- sex: one-hot over ``sexes`` plus "unknown";
- body site: one-hot over ``sites`` (HAM10000's ``localization`` values) plus "unknown".

Every field has its own "unknown", so a missing field is an input the model has learnt, not a zero it has to
guess about. A checkpoint stores the encoding it was trained with, so a later change of these lists never
changes how an old model reads its inputs.

**Fusion** (:class:`MetadataHead`): late fusion by concatenation. The encoded row goes through a small
embedding (Linear, ReLU) that is concatenated to the backbone's pooled image features; the ordinary head
(:func:`core.models.architectures.make_head`'s ``mlp`` or ``linear``, widened by the embedding) maps the result to the
classes. The backbone never sees metadata, so its cached features stay valid and head-only training on
them stays fast. The head's input is ``[pooled features | encoded metadata]`` in one tensor, so cached
features plus metadata train it as features alone train an ordinary head.

**Withholding.** In training mode each field of each row is replaced by its "unknown" with probability
``withhold``, independently (dropout for metadata), so that the model works when any field is unknown; in
eval mode rows pass unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

FORMAT = "lesionlab-metadata/1"
# HAM10000's ``localization`` values (its "unknown" is the encoding's unknown), alphabetical.
SITES: tuple[str, ...] = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
)
SEXES: tuple[str, ...] = ("female", "male")
FIELDS = ("age", "sex", "site")
UNKNOWN = "unknown"
# HAM10000's ages run 0-85 in steps of 5; dividing by 100 keeps the scaled age within what a head learns from.
AGE_SCALE = 100.0
MAX_AGE = 120
EMBED_DIM = 16


class MetadataError(ValueError):
    """Metadata that cannot be encoded; the message says which field and what is allowed."""


def _name(value: object) -> str:
    """A sex or site as the encoding spells it: lower case, single spaces ("lower_extremity" too)."""
    return " ".join(str(value).replace("_", " ").lower().split())


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and _name(value) in ("", UNKNOWN)


@dataclass(frozen=True)
class MetadataEncoding:
    """How age, sex and site become a row of numbers (see the module docstring)."""

    sites: tuple[str, ...] = SITES
    sexes: tuple[str, ...] = SEXES
    age_scale: float = AGE_SCALE
    max_age: int = MAX_AGE

    @property
    def width(self) -> int:
        return 2 + len(self.sexes) + 1 + len(self.sites) + 1

    def slices(self) -> dict[str, slice]:
        """Each field's columns, by name."""
        sex = 2 + len(self.sexes) + 1
        return {"age": slice(0, 2), "sex": slice(2, sex), "site": slice(sex, self.width)}

    def unknown_row(self) -> np.ndarray:
        """The row of a case whose every field is unknown."""
        row = np.zeros(self.width, dtype=np.float32)
        for part in self.slices().values():
            row[part.stop - 1] = 1.0  # each field's last column is its "unknown"
        return row

    def unknown(self, n: int) -> np.ndarray:
        """``n`` rows with every field unknown: what a model is given when no metadata is."""
        return np.tile(self.unknown_row(), (n, 1))

    def encode(self, age: float | str | None = None, sex: str | None = None, site: str | None = None) -> np.ndarray:
        """One case's row. ``None``, NaN, "" and "unknown" mean unknown; anything else must be an age from 0 to
        ``max_age`` or one of ``sexes`` / ``sites``, else :class:`MetadataError` names the field and what it
        allows: a typo must not silently become "unknown"."""
        row = self.unknown_row()
        parts = self.slices()
        if not _is_missing(age):
            try:
                years = float(age)
            except (TypeError, ValueError):
                raise MetadataError(f"age must be a number of years; got {age!r}") from None
            if not 0 <= years <= self.max_age:  # NaN fails this too
                raise MetadataError(f"age must be from 0 to {self.max_age} years; got {age!r}")
            row[parts["age"]] = (years / self.age_scale, 0.0)
        for field, value, names in (("sex", sex, self.sexes), ("site", site, self.sites)):
            if _is_missing(value):
                continue
            key = _name(value)
            if key not in names:
                raise MetadataError(f"{field} must be one of {', '.join(names)} or unknown; got {value!r}")
            row[parts[field]] = 0.0
            row[parts[field].start + names.index(key)] = 1.0
        return row

    def encode_mapping(self, metadata: Mapping[str, object] | None) -> np.ndarray:
        """:meth:`encode` of ``{"age": …, "sex": …, "site": …}`` (any may be left out); None is all unknown."""
        metadata = dict(metadata or {})
        extra = sorted(set(metadata) - set(FIELDS))
        if extra:
            raise MetadataError(f"unknown metadata field {', '.join(extra)}; the fields are {', '.join(FIELDS)}")
        return self.encode(**metadata)

    def encode_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """One row per image of a dataset table (``age``, ``sex``, ``localization`` columns, each optional).

        Unlike :meth:`encode`, a value outside the encoding (an age out of range, a site another archive names
        its own way) becomes unknown: a model cannot use a name it never learnt, and one odd row must not stop
        an evaluation. :meth:`known` says how many rows kept each field.
        """
        n = len(frame)
        rows = self.unknown(n)
        parts = self.slices()
        column = lambda name: frame[name] if name in frame.columns else pd.Series([None] * n)  # noqa: E731
        age = pd.to_numeric(column("age"), errors="coerce").to_numpy(dtype=float)
        known_age = np.isfinite(age) & (age >= 0) & (age <= self.max_age)
        rows[known_age, parts["age"].start] = age[known_age] / self.age_scale
        rows[known_age, parts["age"].start + 1] = 0.0
        for field, name, names in (("sex", "sex", self.sexes), ("site", "localization", self.sites)):
            keys = column(name).map(lambda v: "" if _is_missing(v) else _name(v)).to_numpy()
            for i, value in enumerate(names):
                hit = keys == value
                rows[hit, parts[field]] = 0.0
                rows[hit, parts[field].start + i] = 1.0
        return rows

    def known(self, rows: np.ndarray | torch.Tensor) -> dict[str, int]:
        """How many of ``rows`` know each field."""
        values = torch.as_tensor(rows)
        return {field: int((values[:, part.stop - 1] == 0).sum()) for field, part in self.slices().items()}

    def withhold(
        self, rows: torch.Tensor, probability: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``rows`` with each field of each row set to unknown with ``probability``, independently."""
        if probability <= 0:
            return rows
        unknown = torch.as_tensor(self.unknown_row(), dtype=rows.dtype, device=rows.device)
        out = rows.clone()
        for part in self.slices().values():
            drop = torch.rand(len(rows), 1, generator=generator, device=rows.device) < probability
            out[:, part] = torch.where(drop, unknown[part], rows[:, part])
        return out

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "sites": list(self.sites),
            "sexes": list(self.sexes),
            "age_scale": self.age_scale,
            "max_age": self.max_age,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> MetadataEncoding:
        """Raises ValueError naming the entry that is not a usable encoding."""
        if d.get("format") != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}; got {d.get('format')!r}")
        for key in ("sites", "sexes"):
            names = d.get(key)
            if not isinstance(names, list | tuple) or not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{key} must be a list of names; got {names!r}")
        scale, top = d.get("age_scale"), d.get("max_age")
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not 0 < scale < math.inf:
            raise ValueError(f"age_scale must be a number above 0; got {scale!r}")
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"max_age must be a whole number from 1; got {top!r}")
        return cls(tuple(d["sites"]), tuple(d["sexes"]), float(scale), top)


def describe(metadata: Mapping[str, object] | None) -> str:
    """The known fields of ``metadata`` in words ("age 45, male, back"), "" when none is known."""
    metadata = metadata or {}
    bits = []
    if not _is_missing(metadata.get("age")):
        bits.append(f"age {float(metadata['age']):g}")
    bits += [_name(metadata[f]) for f in ("sex", "site") if not _is_missing(metadata.get(f))]
    return ", ".join(bits)


class MetadataHead(nn.Module):
    """The head of a model that also takes metadata: see "Fusion" and "Withholding" in the module docstring.

    Its input is ``[pooled features (in_features) | encoded metadata (encoding.width)]``; :meth:`join` builds
    it. ``classifier`` is the ordinary head, taking ``in_features + embed_dim`` inputs.
    """

    def __init__(
        self,
        in_features: int,
        classifier: nn.Module,
        encoding: MetadataEncoding,
        embed_dim: int = EMBED_DIM,
        withhold: float = 0.0,
    ):
        super().__init__()
        if not 0 <= withhold <= 1:
            raise ValueError(f"withhold must be a probability from 0 to 1; got {withhold}")
        self.in_features, self.encoding, self.withhold = in_features, encoding, withhold
        self.embed = nn.Sequential(nn.Linear(encoding.width, embed_dim), nn.ReLU(inplace=True))
        self.classifier = classifier

    def forward(self, joined: torch.Tensor) -> torch.Tensor:
        features, rows = joined[:, : self.in_features], joined[:, self.in_features :]
        if self.training:
            rows = self.encoding.withhold(rows, self.withhold)
        return self.classifier(torch.cat([features, self.embed(rows)], dim=1))

    def join(self, features: torch.Tensor, metadata: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        """The head's input for pooled ``features`` (n, in_features) and encoded ``metadata``: None (all
        unknown), n rows, or n / k rows for k views stacked along the batch axis (view after view, as
        :func:`core.inference.forward.flip_views` stacks them), which are repeated for every view."""
        n = len(features)
        rows = torch.as_tensor(self.encoding.unknown(n) if metadata is None else metadata)
        if len(rows) != n:
            if not len(rows) or n % len(rows):
                raise ValueError(f"{len(rows)} metadata rows for a batch of {n} images")
            rows = rows.repeat(n // len(rows), 1)
        return torch.cat([features, rows.to(device=features.device, dtype=features.dtype)], dim=1)

    def spec(self) -> dict:
        """What a checkpoint records to rebuild this head: the encoding, the embedding width and the
        withholding probability it was trained with."""
        return {"encoding": self.encoding.to_dict(), "embed_dim": self.embed[0].out_features, "withhold": self.withhold}


def new_spec(withhold: float = 0.0) -> dict:
    """The spec of a new model that takes metadata, with the current encoding (what ``build_model`` takes)."""
    return {"encoding": MetadataEncoding().to_dict(), "embed_dim": EMBED_DIM, "withhold": float(withhold)}


def read_spec(spec: Mapping) -> tuple[MetadataEncoding, int, float]:
    """(encoding, embedding width, withholding probability) from a checkpoint's ``metadata`` entry
    (:meth:`MetadataHead.spec`); raises ValueError naming the entry that is not usable."""
    if not isinstance(spec.get("encoding"), Mapping):
        raise ValueError(f"encoding must be a dict; got {spec.get('encoding')!r}")
    try:
        encoding = MetadataEncoding.from_dict(spec["encoding"])
    except ValueError as exc:
        raise ValueError(f"encoding.{exc}") from None
    width, withhold = spec.get("embed_dim"), spec.get("withhold", 0.0)
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 1024:
        raise ValueError(f"embed_dim must be a whole number from 1 to 1024; got {width!r}")
    if not isinstance(withhold, int | float) or isinstance(withhold, bool) or not 0 <= withhold <= 1:
        raise ValueError(f"withhold must be a probability from 0 to 1; got {withhold!r}")
    return encoding, width, float(withhold)
