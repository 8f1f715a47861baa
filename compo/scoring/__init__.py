"""A model's view of the pairs: loading models and tokenizers (models), sequence log-probs
(logprobs), the clean/noisy split by margin (split), and held-out metrics with bootstrap
intervals (evaluate). It may import compo.core and compo.data."""
