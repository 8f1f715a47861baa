"""ComPO stage 2: zeroth-order fine-tuning of the output layer with a comparison oracle."""
