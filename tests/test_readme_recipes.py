"""Every policy snippet in README's "Pricing recipes" section is a complete policy the loader accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sidecar.config.policy.loader import load_policy
from sidecar.errors import PolicyInvalid

README = Path(__file__).resolve().parents[1] / "README.md"


def recipes() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Pricing recipes") : text.index("## Meters the response tells")]
    return re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)


RECIPES = ["request-quotas", "llm-tokens-reserved", "prepaid-credit-packs", "soft-limits-overage"]


def test_the_section_has_its_four_recipes() -> None:
    assert len(recipes()) == len(RECIPES)


@pytest.mark.parametrize("index", range(len(RECIPES)), ids=RECIPES)
def test_each_recipe_is_accepted_by_the_loader(index: int, tmp_path: Path) -> None:
    text = recipes()[index]
    if "format: stripe" in text:  # the recipe's own note: stripe needs each customer's Stripe id
        text = text.replace("acme: {plan: growth,", "acme: {plan: growth, stripe_customer_id: cus_123,")
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    policy = load_policy(path)
    assert "acme" in policy.customers


def test_the_stripe_recipe_without_a_stripe_customer_id_is_refused_as_its_note_says(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipes()[3])
    with pytest.raises(PolicyInvalid, match="needs stripe_customer_id on every customer"):
        load_policy(path)
