"""What a run's tokens cost: the prices that apply to its model, and the figure as it is shown (pure).

Prices are per million tokens, in whatever currency the user thinks in: no symbol is printed, so
`--price-input 0.15` shows as `cost 0.0123`, never as dollars the user did not say. A model's own
entry in `prices:` (YAML, `{model: {input: .., output: ..}}`) wins over `--price-input` /
`--price-output`, which also fill a side the entry leaves out; a side nobody priced costs 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchgen.errors import ConfigError

if TYPE_CHECKING:
    from batchgen.config import RunConfig

__all__ = ["TOKENS_PER_PRICE", "Prices", "checked_prices", "format_cost", "run_prices"]

TOKENS_PER_PRICE = 1_000_000  # a price is for this many tokens


@dataclass(frozen=True, slots=True)
class Prices:
    """The prices of one model, per million tokens.

    Args:
        input: per million prompt tokens.
        output: per million generated tokens (reasoning included: servers count it there).
        model: the `prices:` entry they come from; None when they are the flat `--price-*` ones.

    Example:
        Prices(0.15, 0.6).cost(input_tokens=120_000, output_tokens=40_000)  # 0.042
    """

    input: float
    output: float
    model: str | None = None

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / TOKENS_PER_PRICE

    def tokens_for(self, amount: float, *, output: bool) -> float:
        """How many tokens of one side `amount` buys (infinite when that side is free)."""
        price = self.output if output else self.input
        return amount * TOKENS_PER_PRICE / price if price > 0 else math.inf

    def describe(self) -> str:
        origin = f"; prices of {self.model}" if self.model is not None else ""
        return f"input {self.input:g}, output {self.output:g} per million tokens{origin}"


def run_prices(cfg: RunConfig, model: str | None) -> Prices | None:
    """The prices of `model` under `cfg`, or None when nothing prices it (then no cost is shown)."""
    own = cfg.prices.get(model) if model else None
    if own is None:
        if cfg.price_input is None and cfg.price_output is None:
            return None
        return Prices(float(cfg.price_input or 0.0), float(cfg.price_output or 0.0))
    return Prices(
        float(own.get("input", cfg.price_input or 0.0)), float(own.get("output", cfg.price_output or 0.0)), model
    )


def checked_prices(cfg: RunConfig, model: str) -> Prices | None:
    """`run_prices`, refusing a `--max-cost` run whose model nothing prices (before anything is sent).

    Raises:
        ConfigError: `max_cost` is set and `model` has no price.
    """
    prices = run_prices(cfg, model)
    if cfg.max_cost is not None and prices is None:
        priced = ", ".join(map(repr, cfg.prices))
        raise ConfigError(f"max_cost: no price for model {model!r} (prices: has {priced}); add it there, "
                          "or give --price-input/--price-output")  # fmt: skip
    return prices


def format_cost(amount: float) -> str:
    """A cost as shown: two decimals from 1 up, else four significant digits (`0.01235`, `0.0000075`).

    Fixed-point always, never `1e-05`: the figures of one run stay comparable at a glance.
    """
    if amount >= 1 or amount <= 0:
        return f"{amount:,.2f}" if amount else "0"
    decimals = min(12, max(4, 3 - math.floor(math.log10(amount))))
    return f"{amount:.{decimals}f}"
