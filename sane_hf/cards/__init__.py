"""Model and dataset cards, rendered from packaged Jinja templates (``sane_hf/templates/``).

The presentation layer of sane-hf: these functions read what the jobs measured (JSON files of a
model folder, a zoo's summary) and format it; they compute no number. Human-readable names of
methods, groups and properties come from :mod:`sane_hf.verdicts`.

>>> from sane_hf.cards import render_model_card   # doctest: +SKIP
>>> print(render_model_card("runs/sane-digits").text)   # doctest: +SKIP
"""

from __future__ import annotations

from sane_hf.cards.dataset_card import render_zoo_card, zoo_card_template_path
from sane_hf.cards.model_card import (
    MODEL_CARD_TAGS,
    NOT_MEASURED,
    model_card_template_path,
    render_model_card,
    write_model_card,
)

__all__ = [
    "MODEL_CARD_TAGS",
    "NOT_MEASURED",
    "model_card_template_path",
    "render_model_card",
    "write_model_card",
    "zoo_card_template_path",
    "render_zoo_card",
]
