"""``surm search``: which structured family, of which size, where, for a model, a task and a parameter budget.

An Optuna study maximises **validation** accuracy (final epoch) over the family and its options, the insertion
mode, the target modules, the learning rate and alpha (:mod:`.space`), every configuration counted exactly before it
trains (:mod:`.counting`). The first trials are an initial design, one configuration within the budget per family;
then the sampler is multivariate TPE (seeded per trial number, with constant liar for parallel workers); a Hyperband
or successive-halving pruner stops trials on the validation accuracy reported after each epoch (:mod:`.study`).

The study lives in an SQLAlchemy storage (``sqlite:///DIR/study.db`` by default): a second ``surm search`` on the
same storage and study name joins it, a killed one resumes it (:mod:`.worker`). At the end the test split is
evaluated once, for the best configuration (and with ``--test-front`` for every Pareto point); the outputs are
``front.md``, ``front.png``, ``adapter_config.json`` (for ``surm finetune --config``), ``best.json`` and
``trials.json``, all written atomically (:mod:`.report`).
"""

from .counting import ParameterCounter
from .settings import SearchSettings
from .space import Candidate, initial_design, sample_candidate
from .study import TrialStatus, make_sampler, open_storage, pareto_front, status_of, trial_folder
from .worker import Search, search

__all__ = [
    "Candidate",
    "ParameterCounter",
    "Search",
    "SearchSettings",
    "TrialStatus",
    "initial_design",
    "make_sampler",
    "open_storage",
    "pareto_front",
    "sample_candidate",
    "search",
    "status_of",
    "trial_folder",
]
