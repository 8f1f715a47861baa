"""Research tools on top of whole runs: `compo eval` (eval_cmd), noise studies over methods,
rates and seeds (study, study_report) and their plots (plots). It may import compo.pipeline and
everything below it."""
