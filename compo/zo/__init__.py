"""Stage 2, ComPO: zeroth-order fine-tuning of the output layer with a comparison oracle. The
oracles are built and checked (oracles); the loop (trainer) runs steps (step) over the cached
head inputs (head), in a space of rows and basis (support), on perturbations drawn from seeds
(perturb; Philox in philox, philox_spec, philox_kernel), with the estimator's pure math
(estimator), warnings (monitor), checkpoints (checkpoint), tracked pairs (track), candidate
generation for judges (generate) and the CPU fused path (fused); run wires it to a workspace.
It may import compo.core, compo.data, compo.scoring, compo.train (saving a model)
and oracles."""
