"""TorchRec distributed integration for TT tables (imported as ``torchrec_tt.sharding``).

The sharder, sharded module, lookups and the TT-aware planner estimator land here; until then
the package is empty and TT collections run unsharded (data-parallel as dense modules).
"""
