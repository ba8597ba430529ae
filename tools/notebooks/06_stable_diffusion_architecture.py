# %% [markdown]
# # 06. The Stable Diffusion architecture
#
# This chapter teaches the whole pipeline, real SD 1.5 weights in the course's code, and the course's own text-to-image model.
#
# *Skeleton:* the lesson itself lands with issue 7; until then this notebook only checks that the
# course's runtime is in place, so the whole course runs under the tests from the first day.

# %%
from common.runtime import budget, describe, seed_everything

seed_everything(0)
print(describe())
print("steps this notebook would train for:", budget(fast=10, cpu=1_000, gpu=10_000))
