"""`peer-dist sweep`: the paper's isoFLOP experiment (He 2024, Figure 1 and Tables 1-2).

spec.py reads a sweep spec (base config, FLOP budgets, methods with their sizes);
plan.py turns it into runs (steps from the FLOP count); runner.py trains each run as a
`peer-dist train` subprocess and skips finished ones; results.py writes results.csv,
results.md and isoflop.png. The command line is in cli.py.
"""

from peer_dist.sweep.plan import Launch, PlannedRun, plan_sweep, steps_for_budget
from peer_dist.sweep.spec import MethodSpec, SizeSpec, SweepSpec, load_spec

__all__ = ["Launch", "MethodSpec", "PlannedRun", "SizeSpec", "SweepSpec", "load_spec", "plan_sweep",
           "steps_for_budget"]
