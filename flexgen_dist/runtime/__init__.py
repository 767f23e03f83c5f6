"""runtime: one rank running its stage: memory budgets of a policy, the block schedule (one loop
with named steps) over an executor that reads weights through a small weight-source protocol,
token choice, pipeline stages, statistics. Knows no files or MPI details. May import: storage,
models, dist, formats, kernels, system, core."""
