"""Evaluation harness: YAML sweeps (models × pruners × keep budgets × tasks), a resumable JSONL results store,
offline local tasks, an lmms-eval backend, and leaderboards with plots.

    vtprune sweep configs/example_sweep.yaml      # -> runs/example/results.jsonl
    vtprune leaderboard runs/example --out runs/example/leaderboard

Modules: :mod:`.schema` (config + validation), :mod:`.cells` (the grid and its hashes), :mod:`.tasks` and
:mod:`.synthetic` (local task folders; testbed tasks come from :mod:`vtprune.testbed`), :mod:`.metrics`,
:mod:`.store` (results JSONL), :mod:`.models` (loading), :mod:`.probe` (per-``generate`` measurements), :mod:`.local`
and :mod:`.lmms_eval_backend` (+ :mod:`.lmms_task`) (backends), :mod:`.sweep_run` (the state both backends share),
:mod:`.parallel` (``accelerate launch``), :mod:`.runner` (the sweep), :mod:`.records` (what a record holds),
:mod:`.leaderboard` and :mod:`.plots`. Reference: ``docs/harness.md``.
"""
