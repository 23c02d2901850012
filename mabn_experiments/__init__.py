"""Experiments around mabn_det, kept apart from the plugin: the synthetic shapes set, the demo behind
`make demo`, the norm study, and their plots. Nothing in `mabn_det` imports this package."""
