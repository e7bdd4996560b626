"""The online learners, one per file, and the config specs that build them.

Every learner is configured the same way, under ``[learners.NAME]`` with a
``kind``; swapping a model or its hyperparameters is a config change.
"""

from __future__ import annotations

from stream.learners.base import Learner
from stream.learners.configured import CustomSpec
from stream.learners.demand import DemandSpec
from stream.learners.pricing import PricingSpec
from stream.learners.ranking import RankingSpec
from stream.learners.recommendation import RecommendationSpec
from stream.learners.risk import RiskSpec

__all__ = ["Learner", "LearnerSpec", "build_learner"]

#: Tagged on ``kind``; each spec validates itself and builds its learner.
LearnerSpec = CustomSpec | PricingSpec | RecommendationSpec | RiskSpec | DemandSpec | RankingSpec


def build_learner(name: str, spec: LearnerSpec, topics: dict[str, str]) -> Learner:
    """Build the learner ``name`` from its spec; ``topics`` maps the contract
    streams (``clicks``, ``purchases``, ``prices``, ``fraud_labels``) to topic names."""
    return spec.build(name, topics)
