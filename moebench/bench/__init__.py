"""The measuring toolkit: the grid, inputs, timing, memory, roofline, environment, records,
run files, the float64 oracle, profiling, the sweep, the gate (and regress, with its
worker), the report, the targets and the asv glue; `moebench` (moebench.cli) drives it."""
