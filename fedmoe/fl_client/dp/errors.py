"""The DP package's exception types: one base, one subclass for the budget stop."""


class DPError(ValueError):
    """Bad DP config, accountant state or model for private training; names bank/field, expected vs got."""


class BudgetExceeded(DPError):
    """The next round would take a bank past its (epsilon, delta) budget; nothing was trained or charged."""
