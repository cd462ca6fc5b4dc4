"""Evaluation of DSD contenders (local adapters, running services) on one benchmark, one judge and one scale.

    benchmark.py    DreamBench, DreamBench++ and JSONL benchmarks
    contenders.py   what generates: the local pipeline with an adapter, or DSD Serve over REST / gRPC
    run.py          `dsd eval run`: resumable generation and scoring
    judge.py        the VLM judge (CP, PF) with versioned instructions in prompts/
    judge_prompts.py   DreamBench++'s own judge prompt files, or ours (not comparable), with their digest
    embeddings.py   DINO, CLIP-I, CLIP-T and the copy-paste check, from local encoder weights (face_id: ../scoring)
    report.py       `dsd eval report`: tables, paired comparisons, contact sheets, CP/PF plot
    training.py     the eval split run during `dsd train`
    random_encoders.py   random-weight DINOv2 and CLIP encoders (tests, benchmarks)
"""
