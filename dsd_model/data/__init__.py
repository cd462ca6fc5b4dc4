"""Self-distillation data: grid prompts, teacher grids, VLM curation and the paired dataset.

    prompts.make_prompts(settings, captions)   prompts.jsonl    captions → grid prompts (LLM or offline template)
    grids.render_grids(settings)               grids.jsonl      the FLUX teacher renders each prompt as a grid
    curate.curate_grids(settings)              curation.jsonl   a VLM keeps grids showing one identical subject
    assemble.build_pairs(settings)             dataset/         (reference, target, caption) pairs, summary.json,
                                                                contact_sheet.png

Every stage reads the previous stage's manifest in `settings.work_dir` (a `settings.DataSettings`) and skips the
items it has already finished. `pairs` holds the dataset contract that training reads. Nothing is imported here,
so reading a dataset does not need the `data` extra (httpx).
"""
