# %% [markdown]
# # 05. Memory-efficient diffusion
#
# This chapter teaches attention slicing, fused attention, checkpointing, half precision, VAE tiling, offloading, each measured.
#
# *Skeleton:* the lesson itself lands with issue 6; until then this notebook only checks that the
# course's runtime is in place, so the whole course runs under the tests from the first day.

# %%
from common.runtime import budget, describe, seed_everything

seed_everything(0)
print(describe())
print("steps this notebook would train for:", budget(fast=10, cpu=1_000, gpu=10_000))
