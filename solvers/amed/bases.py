"""The solvers AMED-Plugin can run on the grid merged with its learned intermediate points: the one
list of them (`PLUGIN_BASES`), and the parameter models of `amed` and `amed_plugin`.

Everything else that names the bases (the parameter schema, the CLI's choices, the declared
order, the order limits, the training recipe) reads this list. Imports nothing outside `solvers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import pydantic

from ..registry import Params


@dataclass(frozen=True)
class PluginBase:
    """One base of AMED-Plugin.

    Attributes:
        name: the base solver's registry name.
        order: the plugin's declared order with this base.
        max_order: the largest multistep order (history length); None for a single-step base.
        default_order: the multistep order when solver_params.max_order is unset.
    """

    name: str
    order: int
    max_order: int | None = None
    default_order: int = 1

    @property
    def multistep(self) -> bool:
        return self.max_order is not None


# In the order clients see them; `ipndm` is the default (the paper's recommended base).
PLUGIN_BASES: dict[str, PluginBase] = {
    base.name: base
    for base in (
        PluginBase("euler", order=1),
        PluginBase("dpm_solver_2", order=2),
        PluginBase("ipndm", order=2, max_order=4, default_order=4),
        PluginBase("ipndm_v", order=2, max_order=4, default_order=4),
        PluginBase("dpmpp_2m", order=2, max_order=3, default_order=2),
    )
}
BASES = tuple(PLUGIN_BASES)
MULTISTEP = tuple(name for name, base in PLUGIN_BASES.items() if base.multistep)
BaseName = Literal[BASES]  # type: ignore[valid-type]  # the schema's enum, from the one list


class AMEDParams(Params):
    """AMED-Solver has no free parameters: r, c (and a) come from the trained predictor."""


class AMEDPluginParams(Params):
    base: BaseName = "ipndm"
    """The solver run on the merged grid."""
    max_order: Annotated[int, pydantic.Field(ge=1, le=4)] | None = None
    """Multistep order limit: ipndm and ipndm_v 1-4 (default 4), dpmpp_2m 1-3 (default 2); none for
    the others."""

    def order_limit(self) -> int:
        if self.max_order is None:
            return PLUGIN_BASES[self.base].default_order
        return self.max_order

    @pydantic.model_validator(mode="after")
    def _check_order(self) -> AMEDPluginParams:
        if self.max_order is not None:
            limit = PLUGIN_BASES[self.base].max_order
            if limit is None:
                raise ValueError(f"max_order only with a multistep base ({', '.join(MULTISTEP)}), not {self.base}")
            if self.max_order > limit:
                raise ValueError(f"max_order in 1..{limit} for base {self.base}")
        return self


__all__ = ["BASES", "MULTISTEP", "PLUGIN_BASES", "AMEDParams", "AMEDPluginParams", "PluginBase"]
