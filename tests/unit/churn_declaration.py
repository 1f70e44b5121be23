"""A subscription model's features, declared once for the tests that need a second model."""

from __future__ import annotations

from typing import Final

CHURN_FEATURES: Final = """
features:
  - name: tenure_months
    kind: numeric
    dtype: int
    minimum: 0
    description: Months since the subscription started.
  - name: plan
    kind: categorical
    dtype: str
    categories: [basic, plus, family]
    description: Subscription plan.
  - name: monthly_spend
    kind: numeric
    dtype: float
    minimum: 0
    nullable: true
    monitored: false
    description: Spend over the last month, in euros.
"""

CHURN_YAML: Final = (
    """
name: churn
description: Probability that a subscriber cancels within a month.
task: classification
registered_model_name: churn-classifier
target:
  name: churned
  description: 1 when the subscriber cancelled, else 0.
"""
    + CHURN_FEATURES
)
