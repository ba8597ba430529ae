# %% [markdown]
# # 03. Latent DDPM
#
# This chapter teaches the forward and reverse process in latent space, the UNet, training on a frozen VAE, DDPM/DDIM/DPM-Solver++.
#
# *Skeleton:* the lesson itself lands with issue 4; until then this notebook only checks that the
# course's runtime is in place, so the whole course runs under the tests from the first day.

# %%
from common.runtime import budget, describe, seed_everything

seed_everything(0)
print(describe())
print("steps this notebook would train for:", budget(fast=10, cpu=1_000, gpu=10_000))
