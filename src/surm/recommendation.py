"""``surm.recommend``: a delta-mode SurmConfig for a parameter budget, by a fixed rule (instant, no training).

The rule (measured in ``docs/results/accuracy_per_parameter.md``; ``surm search`` is the slower, better option):

1. **Where.** The candidate layers are the linear layers (``nn.Linear``, Transformers' ``Conv1D``, 1x1
   convolutions) inside the
   model's repeated blocks (a module path with a numeric index, e.g. ``encoder.layer.3.attention.self.query``);
   embeddings, poolers and heads are left alone. Layers are grouped by *role*, the path after the block index
   (``attention.self.query``), and roles are taken in the order of :data:`ROLE_PRIORITY` (query, value,
   fused qkv, attention output, key, MLP in, MLP out), then any other role in model order.
2. **What.** The first recipe of :data:`RECIPES` (richest first) with which at least :attr:`Recipe.min_roles`
   roles fit in the budget; with it, roles are added in priority order while the total fits (a role that does not
   fit, or whose layers are too small for the recipe's options, ends the list, so the chosen roles are always a
   prefix of the priority order). A recipe that *fills* (:attr:`Recipe.fill`) covers exactly its first
   ``min_roles`` roles and sizes one option to spend the budget evenly over their layers (budget // layers each),
   and applies only where that gives every layer at least the family's default size there. A recipe with
   :attr:`Recipe.attention_options` uses them on the attention roles (the first five of :data:`ROLE_PRIORITY`;
   an ``override_pattern`` of the config naming exactly those targets) and its ``options`` on the others.
3. **How fast.** The recipe's own learning rate (:attr:`Recipe.lr`), which ``surm finetune --budget-params`` uses
   unless ``--lr`` is given.
4. **How many.** Exactly counted: each layer's update (``DeltaUpdate`` of the family at the layer's shape) is
   built on the meta device and its trainable parameters summed, so the result's adapter has at most
   ``budget_params`` parameters.

The same model and budget always give the same config.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .insertion import DeltaUpdate
from .peft import SurmConfig
from .structures import structure
from .validation import is_int

#: Role patterns, most useful first (a role matches the first pattern that its path ends with, dot-separated).
ROLE_PRIORITY: tuple[str, ...] = (
    r"(query|q_proj|q_lin|q)",
    r"(value|v_proj|v_lin|v)",
    r"(c_attn|query_key_value|qkv_proj|Wqkv|qkv)",
    r"(attention\.output\.dense|o_proj|out_proj|out_lin|attn\.c_proj|self_attention\.dense|attention\.dense)",
    r"(key|k_proj|k_lin|k)",
    r"(intermediate\.dense|up_proj|gate_proj|c_fc|fc1|lin1|dense_h_to_4h|w1|w3)",
    r"(output\.dense|down_proj|mlp\.c_proj|fc2|lin2|dense_4h_to_h|w2)",
)
#: How many of :data:`ROLE_PRIORITY`'s patterns (the first ones) name attention roles: q, v, fused qkv, output, k.
ATTENTION_PATTERNS = 5


@dataclass(frozen=True)
class Recipe:
    """A family with its options, the fewest roles it must cover to be chosen, and its learning rate.

    ``lr`` is the AdamW rate measured best for the recipe on its roles (``docs/results/accuracy_per_parameter.md``);
    covering more roles than the family's default targets wants a lower rate than the family's ``default_lr``.
    ``fill`` names a size option (Fourier's ``frequencies``) set to the budget over the layers of the first
    ``min_roles`` roles; None keeps ``options`` as they are and adds roles while they fit. ``attention_options``
    update ``options`` on the attention roles (:func:`is_attention`).
    """

    family: str
    options: dict[str, Any] = field(default_factory=dict)
    min_roles: int = 2
    lr: float = 1e-3
    fill: Optional[str] = None
    attention_options: dict[str, Any] = field(default_factory=dict)

    def role_options(self, target: str) -> dict[str, Any]:
        """The family options the recipe uses on the role ``target``."""
        return {**self.options, **self.attention_options} if is_attention(target) else dict(self.options)

    def settings(self, targets: list[str]) -> dict[str, Any]:
        """The SurmConfig settings (beside structure and targets) that build the recipe on ``targets``: its options,
        and an ``override_pattern`` giving the attention roles among them :attr:`attention_options`."""
        attention = [target for target in targets if is_attention(target)]
        if not self.attention_options or not attention:
            return dict(self.options)
        pattern = "|".join(re.escape(target) for target in attention)
        return {**self.options, "override_pattern": {pattern: dict(self.attention_options)}}


#: Richest first: the first recipe that covers ``min_roles`` roles within the budget is used. Monarch with 16 blocks
#: of rank 1 costs r_b (m + n) per layer, 768 on a 384 x 384 layer (LoRA r=8: 6,144), and reaches rank 16; on every
#: role (MLP included) it beat Monarch 4x4 on q, k, v and the attention output (73,728 parameters) on the validation
#: splits of mr and trec at 41,472; with block rank 2 on the four attention roles (59,904 on MiniLM) it gained
#: again on both, under the checkpoint's mean pooling (85.05 % against 84.48 on mr, 92.58 against 92.21 on trec;
#: one message of 516 behind on sms's), and on test it is ahead of tuned LoRA r=8 on trec and mr, behind on sms
#: (docs/results/comparison_mean_monarch2att.md). Monarch 16 x 1 on q and v alone (9,216 on MiniLM) beat Fourier
#: with 1,228 frequencies on each (14,736, what the rule built there before) on the validation splits of mr (83.54 %
#: against 82.88) and trec (92.76 against 92.58), so 16 x 1 applies from two roles. Fourier with the budget spread
#: over q and v (614 frequencies per layer at a tenth of LoRA r=8's parameters on MiniLM) beat circulant on q, v
#: and the attention output on trec's validation split (92.76 % against 91.84) and tied it on mr's (82.50 against
#: 82.59) (docs/results/accuracy_per_parameter.md).
RECIPES: tuple[Recipe, ...] = (
    Recipe("monarch", {"nblocks": 16, "block_rank": 1}, min_roles=6, lr=1e-2, attention_options={"block_rank": 2}),
    Recipe("monarch", {"nblocks": 16, "block_rank": 1}, min_roles=2, lr=1e-2),
    Recipe("fourier", {}, min_roles=2, lr=3e-2, fill="frequencies"),
    Recipe("circulant", {}, min_roles=1, lr=1e-3),
)


def role_rank(target: str) -> int:
    """The position in :data:`ROLE_PRIORITY` of the first pattern ``target`` ends with (dot-separated), or its length
    if none."""
    for position, pattern in enumerate(ROLE_PRIORITY):
        if re.search(rf"(^|\.){pattern}$", target):
            return position
    return len(ROLE_PRIORITY)


def is_attention(target: str) -> bool:
    """Whether the role ``target`` (``attention.self.query``, ``o_proj``) is one of attention's projections."""
    return role_rank(target) < ATTENTION_PATTERNS


@dataclass(frozen=True)
class Role:
    """The layers of one role: its target name (the path after the block index) and their (out, in) shapes."""

    target: str
    shapes: tuple[tuple[int, int], ...]


def _adaptable(model: nn.Module) -> Iterator[tuple[str, int, int]]:
    """(name, out, in) of every layer a delta update can wrap: linear layers, Conv1D, 1x1 convolutions."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module.out_features, module.in_features
        elif isinstance(module, Conv1D):
            yield name, module.nf, module.weight.shape[0]
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1:
            yield name, module.out_channels, module.in_channels


def model_roles(model: nn.Module) -> list[Role]:
    """The linear layers inside the model's repeated blocks, grouped by role, in :data:`ROLE_PRIORITY` order."""
    shapes: dict[str, list[tuple[int, int]]] = {}
    for name, out_features, in_features in _adaptable(model):
        parts = name.split(".")
        indices = [i for i, part in enumerate(parts) if part.isdigit()]
        if not indices or indices[-1] == len(parts) - 1:
            continue
        shapes.setdefault(".".join(parts[indices[-1] + 1:]), []).append((out_features, in_features))

    order = {target: index for index, target in enumerate(shapes)}
    return [Role(target, tuple(shapes[target])) for target in sorted(shapes, key=lambda t: (role_rank(t), order[t]))]


@functools.lru_cache(maxsize=None)
def layer_parameters(family: str, options: tuple[tuple[str, Any], ...], out_features: int, in_features: int) -> int:
    """Trainable parameters of the delta update of ``family`` (with ``options``) on one (out, in) layer, counted on
    the meta device (nothing is allocated)."""
    with torch.device("meta"):
        update = DeltaUpdate(structure(family, out_features, in_features, **dict(options)))
    return sum(p.numel() for p in update.parameters() if p.requires_grad)


def role_parameters(recipe: Recipe, role: Role) -> Optional[int]:
    """Trainable parameters of ``recipe`` on every layer of ``role``, or None if some layer is too small for its
    options (e.g. 16 Monarch blocks on a layer with 8 inputs)."""
    options = tuple(sorted(recipe.role_options(role.target).items()))
    try:
        return sum(layer_parameters(recipe.family, options, out, in_) for out, in_ in role.shapes)
    except ValueError:
        return None


def filled_recipe(recipe: Recipe, roles: list[Role], budget_params: int) -> Optional[tuple[Recipe, list[str]]]:
    """``recipe`` with its :attr:`Recipe.fill` option set to ``budget_params`` // (the layers of its first
    ``min_roles`` roles), and those roles' targets; None if that is below the family's default size on some layer
    (or does not fit one)."""
    chosen = roles[: recipe.min_roles]
    shapes = [shape for role in chosen for shape in role.shapes]
    value = budget_params // len(shapes)
    options = tuple(sorted(recipe.options.items()))
    if value < max(layer_parameters(recipe.family, options, out, in_) for out, in_ in shapes):
        return None
    sized = replace(recipe, options={**recipe.options, recipe.fill: value})
    costs = [role_parameters(sized, role) for role in chosen]
    if any(cost is None for cost in costs) or sum(costs) > budget_params:  # type: ignore[arg-type]
        return None
    return sized, [role.target for role in chosen]


def recommend(model: nn.Module, budget_params: int) -> SurmConfig:
    """The recommended delta-mode config for ``model`` with at most ``budget_params`` adapter parameters (its
    learning rate: :func:`recommended_recipe`'s ``lr``).

    Args:
        model: the model to adapt (a Transformers model or any module with numbered blocks of linear layers).
        budget_params: the most adapter parameters (a classifier head or other ``modules_to_save`` not counted).

    Returns:
        A :class:`SurmConfig` (structure, options, ``target_modules``); set ``task_type`` and ``modules_to_save`` on
        it as your task needs.

    Raises:
        ValueError: for a budget that is not a positive integer, a model without numbered blocks of linear layers,
            or a budget below the cheapest recommendation (naming what that would need).
    """
    recipe, targets = recommended_recipe(model, budget_params)
    return SurmConfig(structure=recipe.family, target_modules=targets, **recipe.settings(targets))


def recommended_recipe(model: nn.Module, budget_params: int) -> tuple[Recipe, list[str]]:
    """The recipe :func:`recommend` uses for ``model`` and ``budget_params``, and the targets it covers (in
    priority order).

    Raises:
        ValueError: as :func:`recommend`.
    """
    if not is_int(budget_params, minimum=1):
        raise ValueError(f"budget_params must be a positive integer, got {budget_params!r}")
    roles = model_roles(model)
    if not roles:
        raise ValueError(f"{type(model).__name__} has no linear layers inside numbered blocks (such as "
                         "encoder.layer.0.attention.self.query) for surm.recommend; choose target_modules yourself")
    for recipe in RECIPES:
        if recipe.fill is not None:
            filled = filled_recipe(recipe, roles, budget_params)
            if filled is not None:
                return filled
            continue
        chosen, total = [], 0
        for role in roles:
            cost = role_parameters(recipe, role)
            if cost is None or total + cost > budget_params:
                break
            chosen.append(role.target)
            total += cost
        if len(chosen) >= min(recipe.min_roles, len(roles)):
            return recipe, chosen
    cheapest = RECIPES[-1]
    need = role_parameters(cheapest, roles[0])  # circulant fits every shape
    raise ValueError(f"budget_params={budget_params:,} is below the cheapest recommendation ({cheapest.family} on "
                     f"{roles[0].target}: {need:,} parameters); give at least {need:,}")
