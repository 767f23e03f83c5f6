"""planning: the hardware profile of this machine, the cost model of the block schedule, the
optimizer that turns them into a Policy with predicted memory and time, and the plan as printed.
May import: runtime and every floor below it (not engine)."""
