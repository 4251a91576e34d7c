"""PARE: cheaper denoising steps for video diffusion transformers (Wan2.1 via diffusers).

Width: prune attention heads and FFN channels with a role-aware importance score. Depth: a timestep- and
content-conditioned router skips whole blocks per step. Progressive training distils the pruned student from
the full teacher, then trains router and student jointly.
"""

from .arch import PIXEL_SPACE, WAN_VAE, LatentSpace, TokenGrid, token_grid
from .errors import PareError
from .flops import FlopReport, count_flops, count_video_flops
from .generate import Generation, generate
from .loading import ModelBundle, load, load_bundle, register_model_class
from .sampling import Conditioning, SampleResult, SamplerConfig, sample

__version__ = "0.1.0"

__all__ = [
    "Conditioning", "FlopReport", "Generation", "LatentSpace", "ModelBundle", "PIXEL_SPACE", "PareError",
    "SampleResult", "SamplerConfig", "TokenGrid", "WAN_VAE", "count_flops", "count_video_flops", "generate",
    "load", "load_bundle", "register_model_class", "sample", "token_grid",
]  # fmt: skip
