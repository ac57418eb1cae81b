"""Model cards: one TOML file per model (source, license, chat template, defaults). Adding a model is adding a card."""
from pathlib import Path

CARDS_DIR = Path(__file__).parent
