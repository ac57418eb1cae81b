"""Model cards (models/*.toml) and turning a MODEL argument into a bundle folder."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Card:
    name: str
    description: str
    license: str
    source: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    chat_template: dict[str, Any] = field(default_factory=dict)

    @property
    def bundle_dir(self) -> Path:
        return paths.bundles_dir() / self.name


def _cards_dir() -> Path:
    from models import CARDS_DIR
    return CARDS_DIR


def card_names() -> list[str]:
    return sorted(p.stem for p in _cards_dir().glob("*.toml"))


def get_card(name: str) -> Card:
    path = _cards_dir() / f"{name}.toml"
    if not path.is_file():
        raise ModelNotFoundError(f"no model card named {name!r}; known cards: {', '.join(card_names())}")
    data = tomllib.loads(path.read_text())
    return Card(name=data["name"], description=data.get("description", ""), license=data.get("license", "unknown"),
                source=data["source"], defaults=data.get("defaults", {}), chat_template=data.get("chat_template", {}))


def looks_like_path(model: str | Path) -> bool:
    s = str(model)
    return isinstance(model, Path) or "/" in s or "\\" in s or s.startswith(".") or Path(s).exists()


def resolve_bundle(model: str | Path) -> Path:
    """A bundle folder as given, or the cached bundle of a card (which must already be built)."""
    if looks_like_path(model):
        return Path(model)
    card = get_card(str(model))
    if not (card.bundle_dir / "manifest.json").is_file():
        raise ModelNotFoundError(f"model {card.name!r} is not built yet; run `edge-rt export {card.name}`")
    return card.bundle_dir
