"""`peer-dist sweep`: the paper's isoFLOP experiment (He 2024, Figure 1 and Tables 1-2).

spec.py reads a sweep spec (base config, FLOP budgets, methods with their sizes, seeds,
a [tune] learning-rate grid); plan.py turns it into runs (steps from the FLOP count,
tuning runs on the tuning split); runner.py trains each run as a `peer-dist train`
subprocess and skips finished ones; stats.py aggregates seeds, detects bracketed minima,
tests differences against noise and chooses the tuned settings; results.py writes
results.csv, results.md, isoflop.png and tuning.csv. The command line is in cli.py.
"""

from peer_dist.sweep.plan import Launch, PlannedRun, plan_sweep, plan_tuning, steps_for_budget
from peer_dist.sweep.spec import MethodSpec, SizeSpec, SweepSpec, TuneSpec, load_spec

__all__ = ["Launch", "MethodSpec", "PlannedRun", "SizeSpec", "SweepSpec", "TuneSpec", "load_spec", "plan_sweep",
           "plan_tuning", "steps_for_budget"]
