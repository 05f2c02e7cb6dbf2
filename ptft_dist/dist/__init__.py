"""Who am I, and can I reach the others. Import from the module that does the job:

discover.py      who am I: ``discover()`` reads torchrun / deepspeed / accelerate, OpenMPI, SLURM srun
                 variables (or finds one process); ``free_port``, ``derived_port``
layout.py        ``DistEnv`` (where this process sits in the job), ``check_layout``, ``DistError``, ``LayoutError``
slurm.py         SLURM's syntax and tools: host lists, tasks per node, ``scontrol``, GPUs per node
rendezvous.py    can I reach the others: ``init_distributed`` (preflight, process group, topology line),
                 ``preflight``, ``PreflightError``, ``device_for``, ``export_env``
collectives.py   the few collectives every stage uses, alike with or without a process group
launcher_env.py  the parent side: ``.deepspeed_env`` for remote ranks, the ``--exec-b64`` program shim
__main__.py      ``python -m ptft_dist.dist --selftest | --discover | ...``, and what launch.sh calls
"""
