"""Stage 1, gradient training on the clean pairs: the losses as pure functions (losses: DPO and
its variants; unpaired_losses: KTO, BCO), paired DPO-family training (stage1) and its
multi-process helpers (stage1_dist), unpaired KTO / BCO training (stage1_unpaired) with
underlying distribution matching (udm), and LoRA (lora). It may import compo.core, compo.data
and compo.scoring."""
