"""Applications on top of the objectives: the CLI, pipelines and reports, planning, labelling,
LoRA merge, generation, Hugging Face interop."""
