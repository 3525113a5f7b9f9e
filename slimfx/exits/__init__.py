"""Early-exit math: exit heads, entropy thresholds and the plan the runtime follows."""
