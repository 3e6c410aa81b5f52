"""Differentially private local training for one bank (DP-SGD through Opacus).

Per round the Flower ClientApp calls `train_private_round(model, data, cfg, state, seed=...)`
and persists `report.accountant_state` (JSON) in the bank state dir before releasing the update.
Importing this package registers fedmoe's per-sample gradient samplers with Opacus.
"""

from fedmoe.fl_client.dp import samplers  # noqa: F401  (registration)
from fedmoe.fl_client.dp.accountant import (
    AccountantState,
    BudgetCheck,
    HistoryEntry,
    check_budget,
    epsilon_for_history,
    noise_multiplier_for,
    sample_rate_for,
)
from fedmoe.fl_client.dp.config import DPConfig
from fedmoe.fl_client.dp.engine import PrivateModel, check_model, make_private, plan_norm_methods
from fedmoe.fl_client.dp.errors import BudgetExceeded, DPError
from fedmoe.fl_client.dp.trainer import RoundPrivacyReport, check_data, train_private_round

__all__ = [
    "AccountantState",
    "BudgetCheck",
    "BudgetExceeded",
    "DPConfig",
    "DPError",
    "HistoryEntry",
    "PrivateModel",
    "RoundPrivacyReport",
    "check_budget",
    "check_data",
    "check_model",
    "epsilon_for_history",
    "make_private",
    "noise_multiplier_for",
    "plan_norm_methods",
    "sample_rate_for",
    "train_private_round",
]
