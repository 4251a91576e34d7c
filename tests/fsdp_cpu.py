"""`python -m torch.distributed.run --nproc_per_node N tests/fsdp_cpu.py ARGS`: `pare ARGS` under FSDP on CPU
processes (gloo), for tests.

accelerate turns FSDP on only for accelerator devices: on CPU processes it sets MULTI_CPU and drops the FSDP
plugin, although torch's FSDP2 (`fully_shard`) and its distributed checkpoints run on CPU with gloo. This
launcher puts the plugin back so that PARE's FSDP code (sharded checkpoints, the frozen teacher kept out of the
registry, the export that gathers once) runs here as it would on GPUs. The plugin comes from accelerate's own
environment variables (ACCELERATE_USE_FSDP, FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ...), as `accelerate launch
--use_fsdp` sets them.
"""

import sys

import accelerate.state as state
from accelerate.utils import DistributedType

_init, _plugin = state.AcceleratorState.__init__, []


def _init_keeping_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if kwargs.get("fsdp_plugin") is not None:
        _plugin[:] = [kwargs["fsdp_plugin"]]
    # later AcceleratorState() calls (without the plugin) re-read the shared state: keep it FSDP
    if self.distributed_type == DistributedType.MULTI_CPU and _plugin:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, _plugin[0]


state.AcceleratorState.__init__ = _init_keeping_fsdp

if __name__ == "__main__":
    from pare.cli import entry

    entry(sys.argv[1:])
