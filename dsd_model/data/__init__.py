"""Self-distillation data: grid prompts, teacher grids, VLM curation and the paired dataset."""
