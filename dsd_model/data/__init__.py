"""Self-distillation data: grid prompts, teacher grids, per-panel curation, the paired dataset, structure pairs.

    prompts.make_prompts(settings, captions)   prompts.jsonl    captions → grid prompts (LLM or offline template)
    grids.render_grids(settings)               grids.jsonl      the teachers render each prompt as a grid
    curate.curate_grids(settings)              curation.jsonl   each panel judged consistent or not (VLM, or
                                                                offline panel similarity from `embed`)
    assemble.build_pairs(settings)             dataset/         (reference, target, caption) pairs of consistent
                                                                panels, summary.json, contact_sheet.png
    structure.make_structure_pairs(settings)   structure.jsonl  pairs rendered from one depth/edge map with two
    structure.write_structure_dataset(...)     dataset/         appearances (the `structure` / `relight` recipes)

Every stage reads the previous stage's manifest in `settings.work_dir` (a `settings.DataSettings`) and skips the
items it has already finished. `pairs` holds the dataset contract that training reads. Nothing is imported here,
so reading a dataset does not need the `data` extra (httpx, OpenCV).
"""
