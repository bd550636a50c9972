"""The training core that every task shares: config, optimiser, schedule, state, run helpers."""
