"""The self-configuring planner: integrity check, fingerprint, plan rules and folds."""
