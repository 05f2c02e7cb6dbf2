"""``ptft plan``: memory and speed of a pretraining job on N nodes, before it is submitted.

    plan/hardware.py   accelerators, interconnects, measured MFU -- each number with its source
    plan/workload.py   the config's model (exact parameter count on the meta device), FLOPs, shapes
    plan/memory.py     peak memory per rank per ZeRO stage: states, activations, buffers
    plan/comms.py      bytes per step per ZeRO stage (as DeepSpeed sends them), ring/tree time
    plan/steptime.py   compute (FLOPs ÷ peak × MFU, or calibrated from a run) + exposed communication
    plan/recommend.py  what fits, micro-batch × accumulation, the stage to use, 1..N node scaling
    plan/planner.py    request → plan (plain data), the sbatch line
    plan/report.py     text / JSON

Every model is checked against real runs in tests/plan/ (docs/scaling.md has the tables).
"""
