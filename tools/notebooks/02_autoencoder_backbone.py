# %% [markdown]
# # 02. The autoencoder backbone
#
# This chapter teaches the encoder/decoder of Stable Diffusion's VAE, block by block, checked against diffusers.
#
# *Skeleton:* the lesson itself lands with issue 3; until then this notebook only checks that the
# course's runtime is in place, so the whole course runs under the tests from the first day.

# %%
from common.runtime import budget, describe, seed_everything

seed_everything(0)
print(describe())
print("steps this notebook would train for:", budget(fast=10, cpu=1_000, gpu=10_000))
