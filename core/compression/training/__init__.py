"""Recovery training shared by the distill and lora steps: data windows with a held-out split, constraints that
keep pruning masks and quantization encodings valid while weights train, objectives, checkpoints, the loop."""
